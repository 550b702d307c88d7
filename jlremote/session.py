"""A session's life on this machine: whether its tunnel is up, taking it down, and the
shared ssh connection that goes with a host's last session."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from jlremote import browser, desk, guard, keeper, loopback, remote, ssh, supervision, tunnel
from jlremote.errors import ExitCode, JlremoteError
from jlremote.paths import ensure_private_dir, state_dir
from jlremote.state import AppForward, Session, StateStore, Tunnel

log = logging.getLogger(__name__)

T = TypeVar("T")


def config_for(cfg: ssh.SshConfig, session: Session, share: bool = True) -> ssh.SshConfig:
    """CFG as every connection for SESSION must use it: pinned to its login node when
    its host's name leads to several. Without SHARE, a pinned connection shares nothing
    (a look that records nothing leaves no connection of its own behind)."""
    if not session.server.pinned:
        return cfg
    found = remote.pinned(cfg, session.host, session.server.login_addr)
    return found if share else replace(found, control_dir=None)


def on_login(
    cfg: ssh.SshConfig,
    store: StateStore | None,
    session: Session,
    call: Callable[[ssh.SshConfig], T],
) -> T:
    """CALL(cfg) on SESSION's login node. Through the host's name as usual (no extra
    round trip); when that led to another login node, pinned to the session's one, and
    from then on (recorded in STORE)."""
    try:
        return call(config_for(cfg, session))
    except JlremoteError as exc:
        if not remote.elsewhere(exc) or session.server.pinned or not session.server.login_addr:
            raise
    log.info(
        "%s led to another login node than session %s's (%s): connecting to that one",
        session.host,
        session.name,
        session.server.login_name,
    )
    session = pin(store, session)
    return call(config_for(cfg, session))


def wrong_login(session: Session, exc: JlremoteError) -> bool:
    """Could EXC mean that a new tunnel reached another login node than SESSION's (and
    that pinning it to its own would help)? Its server's port proven not there, or its
    Unix socket refused (the socket's file is on the shared home; its listener is not)."""
    if session.server.pinned or not session.server.login_addr or session.server.job_id:
        return False
    said = (exc.message + "\n" + exc.detail).lower()
    return remote.elsewhere(exc) or (exc.code == ExitCode.TUNNEL and "open failed" in said)


def probe(cfg: ssh.SshConfig, store: StateStore | None, session: Session) -> str:
    """`running`, `gone` or `foreign` for SESSION's server, asked on its login node."""
    server, host = session.server, session.host
    timeout = cfg.connect_timeout + 15
    share = store is not None
    use = config_for(cfg, session, share)
    state = remote.probe(use, host, [server], timeout).get(server.session_id)
    if state == "elsewhere" and not server.pinned and server.login_addr:
        session = pin(store, session)
        answer = remote.probe(config_for(cfg, session, share), host, [server], timeout)
        state = answer.get(server.session_id)
    return "gone" if state == "elsewhere" else (state or "unknown")


def pin(store: StateStore | None, session: Session) -> Session:
    """SESSION, pinned to its login node from now on (and so recorded)."""
    session = replace(session, server=replace(session.server, pinned=True))
    if store is not None:
        with store.transaction() as sessions:
            current = sessions.get(session.name)
            if current is not None and current.server.session_id == session.server.session_id:
                sessions[session.name] = replace(
                    current, server=replace(current.server, pinned=True)
                )
    return session


def add_apps(cfg: ssh.SshConfig, session: Session, master: Tunnel) -> None:
    """Forward SESSION's other apps again over MASTER (a re-opened tunnel), from the
    sockets their held ports are carried to. One that cannot be is said, not fatal."""
    for app in session.forwards:
        try:
            target = session.app_target(app.remote_port)
            tunnel.forward(cfg, session.host, master, tunnel.forward_path(app.local_port), target)
        except JlremoteError as exc:
            log.warning("%s: %s: %s", session.name, app.label, exc.message)


def hold_apps(session: Session) -> None:
    """Hand SESSION's apps' ports to its (new) supervisor again; one taken meanwhile is
    said, not fatal."""
    at = tunnel.desk_path(session.tunnel.local_port)
    for app in session.forwards:
        try:
            with keeper.listen(app.local_port, loopback.app_address()) as listener:
                desk.hand(at, listener)
        except JlremoteError as exc:
            log.warning("%s: %s: %s", session.name, app.label, exc.message)


def new_apps(
    cfg: ssh.SshConfig, session: Session, wanted: list[AppForward]
) -> tuple[AppForward, ...]:
    """WANTED forwarded too: each port (a free one where none is given) bound here and
    handed to SESSION's supervisor, which holds it from then on, and forwarded over
    SESSION's tunnel when it is up (its keeper adds them at its next re-open otherwise);
    returns SESSION's forwards with them. Nothing is forwarded unless all can be."""
    added: list[AppForward] = []
    at = tunnel.desk_path(session.tunnel.local_port)
    try:
        for app in wanted:
            with keeper.listen(app.local_port, loopback.app_address()) as listener:
                port = int(listener.getsockname()[1])
                desk.hand(at, listener)
            added.append(replace(app, local_port=port))
            if tunnel.is_up(session.tunnel):
                target = session.app_target(app.remote_port)
                tunnel.forward(cfg, session.host, session.tunnel, tunnel.forward_path(port), target)
    except BaseException:
        drop_apps(cfg, session, added)
        raise
    return (*session.forwards, *added)


def drop_apps(cfg: ssh.SshConfig, session: Session, apps: list[AppForward]) -> None:
    """Stop forwarding APPS, and let their ports go (quietly: a tunnel that is down
    forwards nothing)."""
    at = tunnel.desk_path(session.tunnel.local_port)
    up = tunnel.is_up(session.tunnel)
    for app in apps:
        with contextlib.suppress(JlremoteError):
            desk.release(at, app.local_port)
        if up:
            with contextlib.suppress(JlremoteError):
                target = session.app_target(app.remote_port)
                path = tunnel.forward_path(app.local_port)
                tunnel.forward(cfg, session.host, session.tunnel, path, target, cancel=True)


def tunnel_state(session: Session) -> str:
    """`up` (its ssh runs), `reconnecting` (its supervisor is re-opening it), `failed`
    (the supervisor gave up), `needs login` (re-opening it would prompt: `start` asks),
    `down`, or `none` (a queued job: no server yet)."""
    if session.phase != "running":
        return "none"
    if tunnel.is_up(session.tunnel):
        return "up"
    report = supervision.read_status(session.name)
    if report is not None and report.state in ("failed", "needs login"):
        return report.state  # (its supervisor still holds the port)
    if supervision.of(session).alive():
        return "reconnecting"
    return "down"


def tunnel_log(name: str) -> Path:
    """Where the ssh of session NAME's tunnel writes."""
    return ensure_private_dir(state_dir() / "logs") / f"{name}.tunnel.log"


def close_local(session: Session) -> bool:
    """Its supervisor (first, or it would re-open the tunnel), then its tunnel; whether
    the tunnel was up."""
    supervision.stop(session)
    was_up = tunnel.close_tunnel(session.tunnel)
    if session.tunnel.local_port:  # the sockets a killed ssh or supervisor left
        ports = [session.tunnel.local_port, *(a.local_port for a in session.forwards)]
        paths = [tunnel.forward_path(p) for p in ports]
        for path in [*paths, tunnel.desk_path(session.tunnel.local_port)]:
            with contextlib.suppress(FileNotFoundError):
                Path(path).unlink()
    return was_up


def forget(cfg: ssh.SshConfig, store: StateStore, name: str) -> None:
    """Drop NAME's record and its local files; then, if it was the host's last session,
    jlremote's shared connection to the host."""
    for path in (supervision.status_path(name), guard.record_path(name)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    browser.remove_page(name)
    with store.transaction() as sessions:
        gone = sessions.pop(name, None)
    if gone is not None:
        pinned = config_for(cfg, gone) if gone.server.pinned else None
        release_if_unused(cfg, store, gone.host, pinned)


def release_if_unused(
    cfg: ssh.SshConfig, store: StateStore, host: str, pinned: ssh.SshConfig | None = None
) -> None:
    """Close jlremote's shared connection to HOST when no session of it is left, and the
    one to HOST's login node of PINNED when no session is pinned to that node any more."""
    left = [s for s in store.read().values() if s.host == host]
    if not left:
        with contextlib.suppress(JlremoteError):
            remote.release(cfg, host)
    if pinned is not None and pinned.pin is not None:
        addr = pinned.pin[0]
        if not any(s.server.pinned and s.server.login_addr == addr for s in left):
            with contextlib.suppress(JlremoteError):
                remote.release(pinned, host)


def end(cfg: ssh.SshConfig, store: StateStore, session: Session, grace: float) -> str:
    """Take SESSION down whole: supervisor, tunnel, exactly its server (or job), record.
    Returns what happened to the server (see remote.stop); raises, keeping the record,
    when the remote cannot be asked."""
    close_local(session)
    state = stop_server(cfg, store, session, grace)
    forget(cfg, store, session.name)
    return state


def stop_server(
    cfg: ssh.SshConfig, store: StateStore | None, session: Session, grace: float
) -> str:
    """Stop exactly SESSION's server, on its login node (see remote.stop)."""
    ident = remote.identity(session.server)
    return on_login(cfg, store, session, lambda c: remote.stop(c, session.host, ident, grace))


def supervise(store: StateStore, session: Session, fixed: bool = False) -> Session:
    """Give SESSION a supervisor that holds its local port and keeps its tunnel up, and
    record it. The port is bound here and handed down; if it was taken meanwhile (say,
    after a reboot here), the session moves to a free one, unless the user asked for that
    port (FIXED)."""
    port = session.tunnel.local_port
    try:
        listener = keeper.listen(port)
    except JlremoteError:
        # Held by the session's guard, which is starting a new supervisor right now?
        again = supervision.revived(store, session.name, session.supervisor_pid)
        if again is not None:
            return again
        if fixed:
            raise
        listener = keeper.listen(0)
        log.warning(
            "local port %d is taken now (not by this session); the session moves to port %d",
            port,
            listener.getsockname()[1],
        )
    with listener:
        sup = supervision.spawn(session.name, listener)
        port = int(listener.getsockname()[1])
    with store.transaction() as sessions:
        current = sessions.get(session.name, session)
        session = replace(
            current,
            supervisor_pid=sup.pid,
            supervisor_created=sup.created,
            tunnel=replace(current.tunnel, local_port=port),
        )
        if session.name in sessions:
            sessions[session.name] = session
    hold_apps(session)  # its apps' ports, held again too
    return session


def apps(session: Session, ask: bool = True) -> list[dict[str, object]]:
    """SESSION's other apps, each {label, local_port, remote_port, url, target, answers}
    (answers: whether it answers HTTP through the tunnel now; None when the tunnel is not
    up, or not ASKed)."""
    up = ask and tunnel.is_up(session.tunnel)
    found: list[dict[str, object]] = []
    for app in session.forwards:
        target = session.app_target(app.remote_port)
        found.append(
            {
                "label": app.label,
                "local_port": app.local_port,
                "remote_port": app.remote_port,
                "url": app.url,
                "target": f"{target.host or '127.0.0.1'}:{app.remote_port}",
                "answers": tunnel.answers_http(app.local_port, address=loopback.app_address())
                if up
                else None,
            }
        )
    return found
