"""The per-session supervisor: a small detached process of ours that holds the session's
local port and keeps the tunnel up.

`start` binds 127.0.0.1:PORT and hands the listening socket to it; it listens there for
as long as the session exists (jlremote.keeper), so that no one else can take the port,
not even while the tunnel is re-opened, and carries each connection to the tunnel's
private socket. Every half second it checks the tunnel's ssh (PID + create time + control
path); when that has died (the link dropped and the keepalives gave up, the laptop slept,
someone killed it) it opens a new one, and the connections held meanwhile go through.
Retries back off from 1 s, doubling, capped at 2 s, for as long as the session exists; an
authentication or host-key failure will not heal by retrying and stops the retries (the
port stays held; `start` re-opens the tunnel). What it is doing is written to
`supervisors/NAME.json` for `status`.

Why our own process and not autossh: autossh gives up when ssh fails within its first 30 s
(its "gate time"), does not know about re-adding the forward to a dedicated master, cannot
hold the port while ssh is down, and cannot tell `status` why it is retrying.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from jlremote import desk, guard, keeper, proc, queued, remote, ssh, tunnel
from jlremote import session as lifecycle
from jlremote.errors import ExitCode, JlremoteError, LockBusy
from jlremote.paths import ensure_private_dir, state_dir
from jlremote.state import Session, StateStore, Tunnel
from jlremote.supervision import SupervisorStatus, owned, waited_for
from jlremote.terminal import CleanFormatter

log = logging.getLogger("jlremote.supervisor")

POLL = 0.5
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 2.0  # a network that comes back is used within about 2 s


def _write_status(name: str, st: SupervisorStatus) -> None:
    directory = ensure_private_dir(state_dir() / "supervisors")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".sup.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(st.__dict__, f)
    os.replace(tmp, directory / f"{name}.json")


def _mine(session: Session | None) -> bool:
    return session is not None and session.supervisor_pid == os.getpid()


class _Stop(Exception):
    pass


def run(
    name: str,
    wait: float,
    port: desk.Ports,
    after: int = 0,
    on_stop: Callable[[], None] = lambda: None,
) -> int:
    """The supervisor's loop; returns when the session is gone, or is no longer ours (a
    new server got its own supervisor). PORT holds the session's port meanwhile. AFTER:
    the PID of the dead supervisor whose session this one takes over. ON_STOP is called
    at once on SIGTERM (the guard must not start another supervisor)."""

    def on_term(_sig: int, _frame: object) -> None:
        on_stop()
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    store = StateStore(state_dir())
    deadline = time.monotonic() + wait
    if after:
        _take_over(store, name, after)
    try:
        first = _resilient(lambda: _first_record(store, name, deadline))
        if first is None:
            return 0  # the start that spawned us did not get as far as recording
    except _Stop:
        return 0
    session_id = first.server.session_id
    port.outage = keeper.Outage(first.host, name=name)
    # In the background nothing may prompt: a re-open that needs a password or a code
    # waits for `start` (needs login).
    cfg = replace(ssh.SshConfig.from_environment(), batch=True)
    try:
        if first.queued and not _resilient(lambda: _await_job(store, cfg, first)):
            return 0
        return _resilient(lambda: _keep(store, cfg, name, port))
    except _Stop:
        # Also a master this loop was starting when told to stop (no record names it
        # yet, and it may have no control socket yet): found by its argv.
        session = store.read().get(name)
        if session is not None and _mine(session):
            tunnel.close_tunnel(session.tunnel)
        path = tunnel.master_path(session_id)  # (where _reopen starts one)
        tunnel.close_tunnel(Tunnel(0, 0, control_path=path), search=True)
        return 0


T = TypeVar("T")


def _take_over(store: StateStore, name: str, dead: int) -> None:
    """Name this process as NAME's supervisor in place of DEAD (its guard saw it die)."""
    me = proc.owned(os.getpid())
    with store.transaction() as sessions:
        current = sessions.get(name)
        if current is not None and current.supervisor_pid == dead:
            sessions[name] = replace(current, supervisor_pid=me.pid, supervisor_created=me.created)
            log.warning("supervisor %d died; this one (%d) takes over", dead, me.pid)


def _resilient(step: Callable[[], T]) -> T:
    """STEP, begun again after any error (a full descriptor table, an unreadable state
    file, a bug): each step starts from the record, and the port must stay held. Only a
    stop (SIGTERM) ends it."""
    while True:
        try:
            return step()
        except _Stop:
            raise
        except Exception:
            log.exception("supervisor: going on after")
            time.sleep(POLL)


def _first_record(store: StateStore, name: str, deadline: float) -> Session | None:
    """NAME's record once it names us (None: not before DEADLINE)."""
    while not _mine(first := store.read().get(name)):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return first


def _keep(store: StateStore, cfg: ssh.SshConfig, name: str, port: desk.Ports) -> int:
    """Keep NAME's tunnel up for as long as the session is ours."""
    logfile = ensure_private_dir(state_dir() / "logs") / f"{name}.tunnel.log"
    st = SupervisorStatus("up", since=time.time())
    _write_status(name, st)
    delay = BACKOFF_FIRST
    retry_at = 0.0
    while True:
        session = store.read().get(name)
        if session is None or not _mine(session):
            return 0  # stopped, or replaced by a new server
        held = port.held
        if tunnel.is_up(session.tunnel):
            if st.state != "up" or st.held != held:
                since = st.since if st.state == "up" else time.time()
                st = SupervisorStatus("up", since=since, held=held)
                _write_status(name, st)
                delay, retry_at = BACKOFF_FIRST, 0.0
            time.sleep(POLL)
            continue
        if st.state in ("failed", "needs login") or time.monotonic() < retry_at:
            # Waiting: for `start` (it logs in, and re-opens the tunnel), or the backoff.
            if st.held != held:
                st = replace(st, held=held)
                _write_status(name, st)
            time.sleep(POLL)
            continue
        st = SupervisorStatus("reconnecting", st.attempts + 1, st.last_error, st.since, held=held)
        _write_status(name, st)
        port.outage = keeper.Outage(session.host, st.state, st.attempts, st.last_error or "", name)
        try:
            # Not while `start` re-opens it (it may be asking for a password meanwhile).
            with store.tunnel_lock(name, timeout=0):
                now = store.read().get(name)
                if now is None or not _mine(now) or tunnel.is_up(now.tunnel):
                    st = replace(st, attempts=st.attempts - 1)
                    continue
                session = now
                new = _reopen(cfg, session, logfile)
                with store.transaction() as sessions:
                    current = sessions.get(name)
                    if current is None or not _mine(current):
                        tunnel.close_tunnel(new)
                        return 0
                    sessions[name] = replace(current, tunnel=new)
        except LockBusy:  # `start` re-opens it now: its turn
            st = replace(st, attempts=st.attempts - 1)
            retry_at = time.monotonic() + POLL
            continue
        except JlremoteError as exc:
            log.info("attempt %d failed: %s", st.attempts, exc.message)
            if lifecycle.wrong_login(session, exc):
                # The host's name led to another login node: the session's own, now.
                lifecycle.pin(store, session)
                continue
            # Neither a refused login nor a server that has gone heals by retrying; a
            # login that would need the user (a password, a code) waits for `start`.
            if exc.code in (ExitCode.AUTH, ExitCode.SERVER):
                state = "needs login" if exc.needs_user else "failed"
                st = SupervisorStatus(state, st.attempts, exc.message, time.time(), held=held)
            else:
                st = replace(st, last_error=exc.message)
                retry_at = time.monotonic() + delay
                delay = min(BACKOFF_CAP, delay * 2)
            _write_status(name, st)
            port.outage = keeper.Outage(
                session.host, st.state, st.attempts, st.last_error or "", name
            )
            continue
        log.info("tunnel re-opened on port %d after %d attempt(s)", port.port, st.attempts)


QUEUE_BACKOFF_CAP = 60.0


def _await_job(store: StateStore, cfg: ssh.SshConfig, session: Session) -> bool:
    """A job queued with --no-wait: wait for it, finish its start once it runs, tell the
    user (--notify). True once the session runs (the tunnel is then kept up as usual);
    False if it was stopped, or its job ended first (recorded, with Slurm's reason)."""
    name = session.name
    me = owned(name, os.getpid(), proc.owned(os.getpid()).created)
    since = time.time()
    delay = BACKOFF_FIRST * 5

    def report(text: str) -> None:
        _write_status(name, SupervisorStatus("queued", since=since, detail=text))

    report(f"job {session.server.job_id} queued")
    while True:
        current = store.read().get(name)
        if current is None or not _mine(current) or not current.queued:
            return current is not None and _mine(current) and current.phase == "running"
        try:
            done = queued.complete(cfg, store, current, me, report, lambda: waited_for(name))
        except JlremoteError as exc:
            if exc.needs_user:
                # Watching the job would need a login (a password, a code): never asked
                # here; the next `start` or `wait` finishes the start itself (through the
                # port held here).
                _write_status(name, SupervisorStatus("needs login", 0, exc.message, since))
                return _parked(store, name)
            ended = queued.job_ended(cfg, current)
            if ended:
                log.info("job %s ended while queued: %s", current.server.job_id, ended)
                with store.transaction() as sessions:
                    now = sessions.get(name)
                    if now is not None and _mine(now) and now.queued:
                        sessions[name] = replace(now, phase="ended", ended=ended)
                _write_status(name, SupervisorStatus("failed", 0, ended, time.time()))
                return False
            log.info("job %s: %s; trying again", current.server.job_id, exc.message)
            report(f"job {current.server.job_id}: {exc.message}; trying again")
            time.sleep(delay)
            delay = min(QUEUE_BACKOFF_CAP, delay * 2)
            continue
        log.info(
            "job %s runs: session %s is up on port %d",
            done.server.job_id,
            name,
            done.tunnel.local_port,
        )
        if done.notify and not waited_for(name):
            queued.tell_ready(done, done.tty)
        return True


def _parked(store: StateStore, name: str) -> bool:
    """Hold the port until a `start` or `wait` has finished the start of NAME's queued job
    (True: the session runs) or it is gone (False)."""
    while True:
        current = store.read().get(name)
        if current is None or not _mine(current) or current.phase == "ended":
            return False
        if current.phase == "running":
            return True
        time.sleep(POLL)


def _reopen(cfg: ssh.SshConfig, session: Session, logfile: Path) -> Tunnel:
    """A new tunnel for SESSION, on its login node: before it forwards, a TCP server's
    port is proven (remote.proof_of); for a Unix socket of a session not pinned yet, one
    look through the new connection says which login node it reached."""
    use = lifecycle.config_for(cfg, session)
    server, t = session.server, session.tunnel
    unsure = bool(server.login and server.login_addr and not server.pinned)
    check = (remote.on_its_login if unsure else remote.proof_of)(use, session.host, server)
    new = tunnel.open_tunnel(
        use,
        session.host,
        server.session_id,
        t.local_port,
        t.target,
        logfile,
        check=check,
        node=t.node,
    )
    lifecycle.add_apps(use, session, new)  # the other apps, on their same local ports
    return new


def main() -> None:
    """`python -m jlremote.supervisor NAME WAIT FD [after=PID link=FD apps=FD,FD]`: the
    extra words when its guard starts it in place of a dead supervisor (PID), handing
    down the session's sockets and its end of their pair."""
    guard.set_process_name("jlremote-sup")
    handler = logging.StreamHandler()
    handler.setFormatter(CleanFormatter("%(asctime)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    name, wait, fd = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    extra = dict(w.partition("=")[::2] for w in sys.argv[4:])
    budget = keeper.Budget.for_fd_limit(keeper.raise_fd_limit())
    listener = socket.socket(fileno=fd)
    local_port = int(listener.getsockname()[1])
    main_port = keeper.Keeper(listener, tunnel.forward_path(local_port), budget=budget)
    ports = desk.Ports(main_port, tunnel.desk_path(local_port), tunnel.forward_path)
    for app_fd in filter(None, extra.get("apps", "").split(",")):
        ports.adopt(socket.socket(fileno=int(app_fd)))
    ports.start()
    link = guard.Link(name, ports.sockets)
    ports.on_hold, ports.on_release = link.hold, link.release
    link.start(socket.socket(fileno=int(extra["link"])) if "link" in extra else None)
    after = int(extra.get("after", "0"))
    try:
        code = run(name, wait, ports, after=after, on_stop=link.bye)
    finally:
        link.bye()
    sys.exit(code)


if __name__ == "__main__":
    main()
