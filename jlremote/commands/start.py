"""`jlremote start`: reuse a live session, or launch a server, forward it and prove it works.

A new session is one transaction (_transaction): each thing it acquires (the tunnel's
connection, the supervisor, the server or the job) registers its own undo on an ExitStack
as it is acquired, so a failure anywhere, Ctrl-C included, leaves nothing behind; the
session is recorded only once its URL answers. What differs between a server on the host
and one in a Slurm job is the backend's launch (_launch_plain, _launch_slurm).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from jlremote import keeper, loopback, remote, scripts, slurm, ssh, supervisor, tunnel
from jlremote import session as lifecycle
from jlremote.errors import ExitCode, JlremoteError
from jlremote.options import (
    StartOptions,
    Transport,
    launch_options,
    parse_forwards,
    seconds,
    validate,
)
from jlremote.paths import state_dir
from jlremote.proc import Owned
from jlremote.results import StartResult
from jlremote.scripts import Rc
from jlremote.state import AppForward, RemoteServer, Session, StateStore, Tunnel

log = logging.getLogger(__name__)

# How often a starting job's server is looked for (a file test through the shared ssh
# connection), and how often squeue is asked about the job.
JOB_POLL_INTERVAL = 0.1
SQUEUE_INTERVAL = 1.0


def start(opts: StartOptions) -> StartResult:
    """Give the user a working URL for OPTS.host, starting as little as possible (with
    --no-wait, a queued job instead)."""
    opts = validate(opts)
    name, host = str(opts.name), opts.host
    cfg = ssh.SshConfig.from_environment(connect_timeout=int(min(10.0, max(1.0, opts.wait))))
    store = StateStore(state_dir())
    with store.name_lock(name, timeout=opts.wait + 60):
        existing = store.read().get(name)
        if existing is not None:
            if existing.host != host:
                raise JlremoteError(
                    f"session {name!r} already runs on {existing.host}; "
                    f"stop it or choose another --name",
                    ExitCode.USAGE,
                )
            if existing.phase == "ended":
                _forget_gone(cfg, store, existing)
            elif existing.queued:
                _other_options(existing, opts)
                if opts.no_wait:
                    return _queued_result(existing, _look(cfg, existing))
            else:
                reused = _reuse(cfg, store, existing, opts)
                if reused is not None:
                    _other_options(existing, opts)
                    if opts.forwards:
                        _more_apps(cfg, store, opts)
                        current = store.read()[name]
                        reused = replace(reused, forwards=_apps_of(current))
                    return reused
        if existing is None or not existing.queued:
            if opts.no_wait:
                return _queue(cfg, store, opts)
            return _fresh(cfg, store, opts)
    # Its job is queued: wait for it without the lock (`stop` may cancel it meanwhile),
    # then reuse the session as any running one.
    await_queued(store, name, opts.wait, opts.progress)
    return start(opts)


def _wanted_apps(opts: StartOptions) -> list[AppForward]:
    """The --forward apps (local port 0: a free one, picked when forwarded)."""
    return parse_forwards(opts.forwards or [])


def _check_app_ports(opts: StartOptions) -> None:
    """The local ports --forward names must be free (and not --local-port)."""
    for app in _wanted_apps(opts):
        if app.local_port and app.local_port == opts.local_port:
            raise JlremoteError(
                f"--forward {app.label}: local port {app.local_port} is the session's own "
                "--local-port",
                ExitCode.USAGE,
            )
        if app.local_port:
            tunnel.require_free_port(app.local_port, loopback.app_address())


def _more_apps(cfg: ssh.SshConfig, store: StateStore, opts: StartOptions) -> None:
    """A live session reused: the --forward apps it does not forward yet are added."""
    session = store.read().get(str(opts.name))
    if session is None or not opts.forwards:
        return
    have = {a.remote_port: a for a in session.forwards}
    labels = {a.label: a for a in session.forwards}
    wanted = []
    for app in _wanted_apps(opts):
        if app.remote_port in have:
            continue
        if app.label in labels:
            raise JlremoteError(
                f"--forward: the label {app.label!r} already names port "
                f"{labels[app.label].remote_port} of session {session.name!r}",
                ExitCode.USAGE,
            )
        wanted.append(app)
    if not wanted:
        return
    for app in wanted:
        if app.local_port:
            tunnel.require_free_port(app.local_port, loopback.app_address())
    forwards = lifecycle.new_apps(lifecycle.config_for(cfg, session), session, wanted)
    with store.transaction() as sessions:
        if str(opts.name) in sessions:
            sessions[str(opts.name)] = replace(sessions[str(opts.name)], forwards=forwards)


def _other_options(existing: Session, opts: StartOptions) -> None:
    if existing.launch_options and existing.launch_options != launch_options(opts):
        log.warning(
            "session %r is already %s with other options; reusing it as it is "
            "(stop it first to start it with the new ones)",
            existing.name,
            "queued" if existing.queued else "running",
        )


def _result(session: Session, reused: bool, reopened: bool, attached: bool = False) -> StartResult:
    return StartResult(
        name=session.name,
        host=session.host,
        url=session.url,
        local_port=session.tunnel.local_port,
        remote_port=session.tunnel.remote_port,
        server_pid=session.server.pid,
        session_dir=session.server.session_dir,
        jupyter_server_version=session.server.version,
        reused=reused,
        tunnel_reopened=reopened,
        transport="socket" if session.server.sock else "tcp",
        attached=attached,
        job_id=session.server.job_id,
        node=session.server.node,
        idle_timeout=session.idle_timeout,
        forwards=_apps_of(session),
    )


def _apps_of(session: Session) -> list[dict[str, object]]:
    """SESSION's other apps as `start --json` lists them (not asked whether they answer)."""
    from jlremote.commands.forward import apps

    return [{k: v for k, v in a.items() if k != "answers"} for a in apps(session, ask=False)]


def _queued_result(session: Session, job: slurm.JobState) -> StartResult:
    """What `start --no-wait` says of a queued job: its id and state, no URL."""
    return StartResult(
        name=session.name,
        host=session.host,
        url="",
        local_port=session.tunnel.local_port,
        remote_port=0,
        server_pid=0,
        session_dir=session.server.session_dir,
        jupyter_server_version="",
        reused=False,
        tunnel_reopened=False,
        transport="",
        job_id=session.server.job_id,
        queued=True,
        job_state=job.state,
        job_reason=job.reason,
        start_estimate=job.start,
        idle_timeout=session.idle_timeout,
    )


def _look(cfg: ssh.SshConfig, session: Session) -> slurm.JobState:
    """What Slurm says of SESSION's job now (PENDING when it cannot tell)."""
    try:
        looked = remote.poll_job(
            cfg, session.host, session.server.session_id, session.server.job_id
        )
    except JlremoteError as exc:
        log.info("could not ask about job %s: %s", session.server.job_id, exc.message)
        return slurm.JobState("PENDING")
    return looked.job or slurm.JobState("PENDING")


# ---- a live session ---------------------------------------------------------------------


def _reuse(
    cfg: ssh.SshConfig, store: StateStore, session: Session, opts: StartOptions
) -> StartResult | None:
    """Same URL for a live session (re-opening its tunnel if needed); None if it is gone.

    Through a Unix socket in the session's private directory, our token answering proves
    the far end is still our server, so the usual path needs no remote command at all. A
    TCP port is proven first to still be the server's own (through the tunnel's own
    connection): another user may listen on a dead server's port and answer anything.
    """
    alive = tunnel.is_up(session.tunnel)
    if alive and remote.needs_proof(session.server):
        try:
            remote.prove_serving(cfg, session.host, session.server, session.tunnel.control_path)
        except JlremoteError as exc:
            if remote.elsewhere(exc):
                alive = False  # a tunnel to the wrong login node: re-opened below
            elif exc.code != ExitCode.SERVER:
                raise
            else:
                _forget_gone(cfg, store, session)
                return None
    if alive and _answers(session, timeout=3.0):
        log.debug("session %s is alive; reusing it", session.name)
        return _result(session, reused=True, reopened=False)
    # We re-open the tunnel ourselves, now (its supervisor waits meanwhile, holding the
    # port; one is started again where it has gone, e.g. after a reboot here).
    opts.progress(f"re-opening the tunnel to {session.host}")
    with store.tunnel_lock(session.name, timeout=cfg.connect_timeout + 30):
        current = store.read().get(session.name)
        if current is None or current.server.session_id != session.server.session_id:
            raise JlremoteError(f"session {session.name!r} was stopped", ExitCode.NO_SESSION)
        session = current
        if not supervisor.of(session).alive():
            fixed = opts.local_port is not None and opts.local_port == session.tunnel.local_port
            session = _supervise(store, session, fixed=fixed)
        if tunnel.is_up(session.tunnel) and _answers(session, timeout=3.0):
            return _result(session, reused=True, reopened=True)  # its supervisor did
        tunnel.close_tunnel(session.tunnel)  # only its ssh: the port stays held
        try:
            session, new_tunnel = _reopen(cfg, store, session, timeout=5.0)
        except JlremoteError as exc:
            if exc.code in (ExitCode.CONNECT, ExitCode.AUTH, ExitCode.NO_SSH):
                raise
            # SERVER: the re-open's own check found it gone. Otherwise there was no
            # answer: the server may be gone. Ask the remote whether it is still ours.
            if exc.code != ExitCode.SERVER and lifecycle.probe(cfg, store, session) == "running":
                raise
            _forget_gone(cfg, store, session)
            return None
        with store.transaction() as sessions:
            now = sessions.get(session.name)
            if now is not None and now.server.session_id == session.server.session_id:
                session = replace(now, tunnel=new_tunnel, server=session.server)
                sessions[session.name] = session
    return _result(session, reused=True, reopened=True)


def _answers(session: Session, timeout: float) -> bool:
    """The server answers our token on the session's port, which is proven ours first
    (the token goes nowhere else)."""
    t = session.tunnel
    if not supervisor.holds_port(session):
        log.info("port %d is not held by session %s's supervisor", t.local_port, session.name)
        return False
    return (
        tunnel.api_status(t.local_port, session.server.base_url, session.token, timeout) is not None
    )


def _forget_gone(cfg: ssh.SshConfig, store: StateStore, session: Session) -> None:
    """The session's server is gone: its supervisor, tunnel, remote directory and record
    go too (so that `start` starts a new one). The recorded process, if it still lives,
    is ours: it goes too."""
    log.info("the server of session %s is gone; starting a new one", session.name)
    lifecycle.end(cfg, store, session, grace=0)


def _supervise(store: StateStore, session: Session, fixed: bool = False) -> Session:
    """Give SESSION a supervisor that holds its local port and keeps its tunnel up, and
    record it. The port is bound here and handed down; if it was taken meanwhile (say,
    after a reboot here), the session moves to a free one, unless the user asked for that
    port (FIXED)."""
    port = session.tunnel.local_port
    try:
        listener = keeper.listen(port)
    except JlremoteError:
        # Held by the session's guard, which is starting a new supervisor right now?
        again = supervisor.revived(store, session.name, session.supervisor_pid)
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
        sup = supervisor.spawn(session.name, listener)
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
    lifecycle.hold_apps(session)  # its apps' ports, held again too
    return session


def _reopen(
    cfg: ssh.SshConfig, store: StateStore, session: Session, timeout: float
) -> tuple[Session, Tunnel]:
    """A new tunnel for SESSION to its port's keeper, proven to answer; on the session's
    login node (should the host's name have led to another one, the session is pinned to
    its own from now on: returned with the tunnel)."""
    try:
        return session, _reopen_once(lifecycle.config_for(cfg, session), session, timeout)
    except JlremoteError as exc:
        if not lifecycle.wrong_login(session, exc):
            raise
    session = lifecycle.pin(store, session)
    return session, _reopen_once(lifecycle.config_for(cfg, session), session, timeout)


def _reopen_once(cfg: ssh.SshConfig, session: Session, timeout: float) -> Tunnel:
    local_port = session.tunnel.local_port
    logfile = lifecycle.tunnel_log(session.name)
    t = tunnel.open_tunnel(
        cfg,
        session.host,
        session.server.session_id,
        local_port,
        session.server.target,
        logfile,
        check=remote.proof_of(cfg, session.host, session.server),
        node=session.tunnel.node,
    )
    try:
        lifecycle.add_apps(cfg, session, t)
        tunnel.wait_for_api(local_port, session.server.base_url, session.token, timeout, logfile)
    except BaseException:
        tunnel.close_tunnel(t)
        raise
    return t


# ---- a new session: one transaction -------------------------------------------------------


@dataclass
class _Tx:
    """What a new session's start holds so far. Every resource is registered on `undo`
    when it is acquired; `undo.pop_all()` keeps them once the session is recorded."""

    cfg: ssh.SshConfig
    store: StateStore
    opts: StartOptions
    undo: contextlib.ExitStack
    session_id: str = field(default_factory=lambda: secrets.token_hex(8))
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    master: Tunnel | None = None  # the tunnel's own connection (closed on undo)
    # The session's local port, bound first and handed to the supervisor, which holds it.
    listener: socket.socket | None = None
    local_port: int = 0
    sup: Owned | None = None  # the supervisor, spawned early (stopped on undo)
    attached: bool = False  # the server is another client's: not ours to stop
    # The login node the tunnel's connection reached (`NAME BOOT_ID`), and whether the
    # host's name leads to several login nodes (then cfg is pinned to the server's).
    master_login: str = ""
    pinned: bool = False
    queued_seen: bool = False  # the job had to wait in the queue (--notify tells)
    # The host asks for a password or a code: the tunnel's own connection is the start's
    # one login, and the launch goes through it (nothing shared is opened).
    one_login: bool = False
    cancelled: bool = False  # the job was cancelled already (no undo needed)

    def pin_to(self, addr: str) -> None:
        """From now on, every connection goes to the login node at ADDR (a new tunnel
        connection there too)."""
        self.cfg = remote.pinned(self.cfg, self.host, addr)
        self.pinned = True
        assert self.master is not None
        tunnel.close_tunnel(self.master)
        self.master = tunnel.start_master(self.cfg, self.host, self.session_id, self.logfile)

    @property
    def host(self) -> str:
        return self.opts.host

    @property
    def name(self) -> str:
        return str(self.opts.name)

    @property
    def logfile(self) -> Path:
        return lifecycle.tunnel_log(self.name)

    def spec(self, transport: str) -> scripts.LaunchSpec:
        o = self.opts
        return scripts.LaunchSpec(
            session_id=self.session_id,
            notebook=o.notebook,
            port=o.port,
            directory=o.directory,
            env=o.env,
            jupyter=o.jupyter,
            allow_root=o.allow_root,
            timeout=o.wait,
            transport=transport,
            name=self.name,
            attach_only=o.attach,
            idle_seconds=seconds(o.idle_timeout) if o.idle_timeout else 0,
            idle_label=o.idle_timeout or "",
            no_wait=o.no_wait,
        )

    def hold_port(self) -> None:
        """Bind the session's local port (--local-port, else a free one) now: from here on
        it is ours, until the session ends (the supervisor holds it)."""
        self.listener = keeper.listen(self.opts.local_port or 0)
        self.undo.callback(self.listener.close)
        self.local_port = int(self.listener.getsockname()[1])

    def own_master(self, master: Tunnel) -> None:
        if self.master is None:
            self.undo.callback(lambda: self.master and tunnel.close_tunnel(self.master))
        self.master = master

    def own_supervisor(self, sup: Owned) -> None:
        self.sup = sup
        self.undo.callback(sup.stop)

    def own_remote(self, cleanup: Callable[[], object]) -> None:
        def quietly() -> None:
            with contextlib.suppress(Exception):
                cleanup()

        self.undo.callback(quietly)

    def connect_and_supervise(self, same_login: bool = False) -> None:
        """The tunnel's own connection and the supervisor (which waits until the record
        names it), plus the imports verification needs: done while the server boots.
        With SAME_LOGIN, the connection must reach the login node the server starts on:
        one look through it (while the server boots) tells, and where the host's name led
        elsewhere, the connection goes to the server's node instead (pinned)."""
        master = tunnel.start_master(self.cfg, self.host, self.session_id, self.logfile)
        self.own_master(master)
        if same_login:
            wait = self.cfg.connect_timeout + 15
            self.master_login, _ = remote.hello(self.cfg, self.host, wait, via=master.control_path)
        tunnel.preload()
        assert self.listener is not None
        self.own_supervisor(supervisor.spawn(self.name, self.listener, self.opts.wait + 60))
        self.listener.close()  # (the supervisor's copy holds the port)


Backend = Callable[[_Tx], RemoteServer]


def _fresh(cfg: ssh.SshConfig, store: StateStore, opts: StartOptions) -> StartResult:
    if opts.local_port is not None:
        tunnel.require_free_port(opts.local_port)
    _check_app_ports(opts)
    try:
        return _new_server(cfg, store, opts)
    except JlremoteError as exc:
        if exc.remote_code != Rc.NOT_FOUND or opts.jupyter != "jupyter":
            raise
        _offer_install(cfg, opts)
    return _new_server(cfg, store, opts)  # the launch finds the private JupyterLab now


def _offer_install(cfg: ssh.SshConfig, opts: StartOptions) -> None:
    """`jupyter` is not on HOST's PATH: set up the private JupyterLab with --install, or
    when the user says yes at a terminal; otherwise say how (exit 6), installing nothing."""
    from jlremote import install

    where = f"~/.jlremote/lab on {opts.host}"
    question = (
        f"jupyter is not on the PATH on {opts.host}. Install a private JupyterLab into "
        f"{where} ({install.SIZE_WORDS}, nothing outside your home; no internet needed "
        "there)?"
    )
    if not opts.install and not opts.confirm(question):
        raise JlremoteError(
            f"jupyter not found on {opts.host}; add --install to set up a private JupyterLab "
            f"in {where} (or `jlremote install {opts.host}`), or point --env/--jupyter at yours",
            ExitCode.REMOTE_ENV,
        )
    install.install(cfg, opts.host, opts.progress)


def _new_server(cfg: ssh.SshConfig, store: StateStore, opts: StartOptions) -> StartResult:
    if opts.slurm:
        return _transaction(cfg, store, opts, _launch_slurm)
    if opts.transport != Transport.AUTO:
        return _transaction(cfg, store, opts, _plain(opts.transport.value))
    if opts.port is not None:  # a remote port was asked for: that is TCP
        return _transaction(cfg, store, opts, _plain("tcp"))
    try:
        return _transaction(cfg, store, opts, _plain("socket"))
    except JlremoteError as exc:
        if not _socket_unsupported(exc):
            raise
        log.info("the socket transport did not work on %s (%s); using TCP", opts.host, exc.message)
        return _transaction(cfg, store, opts, _plain("tcp"))


def _socket_unsupported(exc: JlremoteError) -> bool:
    """Did the socket transport fail for a reason TCP avoids? (an old jupyter_server with no
    --sock, a socket path too long, or an sshd with stream-local forwarding turned off)"""
    if exc.remote_code == Rc.NO_SOCKET:
        return True
    text = (exc.message + "\n" + exc.detail).lower()  # ssh's own words
    return exc.code == ExitCode.TUNNEL and ("prohibited" in text or "open failed" in text)


def _transaction(
    cfg: ssh.SshConfig, store: StateStore, opts: StartOptions, backend: Backend
) -> StartResult:
    """Connect, launch (BACKEND), forward, verify, record: all of it, or nothing."""
    with contextlib.ExitStack() as undo:
        tx = _Tx(cfg, store, opts, undo)
        # Last of the undos: jlremote's shared connection, if no session uses the host.
        undo.callback(
            lambda: lifecycle.release_if_unused(cfg, store, tx.host, tx.cfg if tx.pinned else None)
        )
        # Authenticate once (this may prompt), before anything runs in parallel. A host
        # that asks for a password or a code is asked once, by the tunnel's own
        # connection, which then carries the launch too (one_login).
        tx.hold_port()
        opts.progress(f"connecting to {tx.host}")
        if opts.slurm:
            remote.warm(cfg, tx.host, timeout=cfg.connect_timeout + 15)
        else:
            tx.one_login = not remote.warm_or_ask(cfg, tx.host, cfg.connect_timeout + 15)
        server = backend(tx)
        session = _finish(tx, server)
    if tx.queued_seen and opts.notify:
        tell_ready(session, _own_tty())
    return _result(session, reused=False, reopened=False, attached=tx.attached)


def _finish(tx: _Tx, server: RemoteServer, queued: Session | None = None) -> Session:
    """Forward to SERVER, verify the URL, record the session (in place of the QUEUED
    record it completes, if that is still there) and keep everything acquired."""
    assert tx.master is not None and tx.sup is not None
    opts = tx.opts
    local_port = tx.local_port
    opts.progress(
        f"forwarding 127.0.0.1:{local_port} to "
        + ("a private socket" if server.sock else f"port {server.port}")
        + (f" on {server.node}" if server.node else "")
    )
    tx.own_master(tunnel.add_forward(tx.cfg, tx.host, tx.master, local_port, server.target))
    session = Session(
        name=tx.name,
        host=tx.host,
        token=tx.token,
        server=server,
        tunnel=tx.master,
        launch_options=launch_options(opts),
        supervisor_pid=tx.sup.pid,
        supervisor_created=tx.sup.created,
        notify=opts.notify,
    )
    if tx.pinned:
        session = replace(session, server=replace(server, pinned=True))
    wanted = list(queued.forwards) if queued is not None else _wanted_apps(opts)
    if wanted:
        opts.progress("forwarding " + ", ".join(a.label for a in wanted))
        session = replace(session, forwards=lifecycle.new_apps(tx.cfg, session, wanted))
    opts.progress("verifying the URL")
    tunnel.wait_for_api(
        local_port, server.base_url, tx.token, timeout=_verify_time(opts), log_path=tx.logfile
    )
    with tx.store.transaction() as sessions:
        if queued is not None:
            current = sessions.get(tx.name)
            if current is None or current.server.session_id != tx.session_id:
                raise JlremoteError(f"session {tx.name!r} was stopped", ExitCode.NO_SESSION)
            session = replace(
                session,
                created=current.created,
                launch_options=current.launch_options,
                tty=current.tty,
                notify=current.notify,
            )
        sessions[session.name] = session
    tx.undo.pop_all()
    return session


def _verify_time(opts: StartOptions) -> float:
    return max(5.0, min(opts.wait, 30.0))


# ---- backends: what differs between a server on the host and one in a job ------------------


def _plain(transport: str) -> Backend:
    return lambda tx: _launch_plain(tx, transport)


def _launch_plain(tx: _Tx, transport: str) -> RemoteServer:
    """Start the server through the shared connection while the tunnel's own connection
    and the supervisor are being made; or attach to the live server of the same name."""
    spec = tx.spec(transport)
    pending: Future[None]
    if tx.one_login:
        tx.opts.progress(f"connecting to {tx.host} (the tunnel's connection)")
        tx.connect_and_supervise(True)
        assert tx.master is not None
        tx.opts.progress(f"launching {spec.subcommand} on {tx.host}, waiting for the server")
        launched = remote.launch(tx.cfg, tx.host, spec, tx.token, via=tx.master.control_path)
        pending = Future()
        pending.set_result(None)
    else:
        tx.opts.progress(f"launching {spec.subcommand} on {tx.host}, waiting for the server")
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(tx.connect_and_supervise, True)
            try:
                launched = remote.launch(tx.cfg, tx.host, spec, tx.token)
            finally:
                pending.exception()  # whatever happened, what it made is registered
    if launched.elsewhere:
        # A live server of this name on another login node: attach to it there.
        pending.result()
        tx.pin_to(launched.elsewhere)
        launched = remote.launch(tx.cfg, tx.host, spec, tx.token)
        if launched.attached_token is None:  # it ended meanwhile: ours now, on that node
            ident = remote.identity(launched.server)
            tx.own_remote(lambda: remote.stop(tx.cfg, tx.host, ident, 5))
            return launched.server
    server = launched.server
    moved = server.login != tx.master_login and server.login_addr and tx.master_login
    if launched.attached_token is None and moved:
        # The tunnel's own connection reached another login node than the server's:
        # the host's name leads to several; the session is pinned to the server's.
        pending.result()
        log.info("%s leads to several login nodes: pinning to %s", tx.host, server.login_name)
        ident = remote.identity(server)
        tx.own_remote(lambda: remote.stop(tx.cfg, tx.host, ident, 5))
        tx.pin_to(server.login_addr)
        return server
    if launched.attached_token is None:
        log.debug("server pid %d listens on remote port %d", server.pid, server.port)
        ident = remote.identity(server)
        tx.own_remote(lambda: remote.stop(tx.cfg, tx.host, ident, 5))
        pending.result()  # its failure, now that the server is owned too
        return server
    pending.result()
    # Another client's server: not ours to stop if attaching fails here, and the tunnel's
    # master must be named after that session.
    tx.token, tx.attached = launched.attached_token, True
    tx.session_id = server.session_id
    assert tx.master is not None
    if not tx.one_login:  # (with one login, the connection that was made stays)
        tunnel.close_tunnel(tx.master)
        tx.own_master(tunnel.start_master(tx.cfg, tx.host, server.session_id, tx.logfile))
    if server.login and server.login_addr and not tx.pinned:
        # Its tunnel must reach the login node it runs on (the host's name may lead to
        # several): one look through the new connection.
        wait = tx.cfg.connect_timeout + 15
        there, _ = remote.hello(tx.cfg, tx.host, wait, via=tx.master.control_path)
        if there != server.login:
            tx.pin_to(server.login_addr)
    check = remote.proof_of(tx.cfg, tx.host, server)
    if check is not None:
        check(tx.master)
    return server


def _launch_slurm(tx: _Tx) -> RemoteServer:
    """Run the server in a batch job submitted on the login host, wait for it (queue and
    start-up both count against --timeout; then it is cancelled), and reach its node."""
    job_id, session_dir = _submit(tx)
    # While the job waits in the queue: the tunnel's own connection to the login host.
    tx.connect_and_supervise()
    return _await_job(tx, job_id, session_dir, deadline=time.monotonic() + tx.opts.wait)


def _submit(tx: _Tx) -> tuple[str, str]:
    """Submit the session's job (cancelled on undo); its id and session directory."""
    opts, cfg, host = tx.opts, tx.cfg, tx.host
    opts.progress("submitting the job")
    spec = tx.spec("tcp")
    job_id, session_dir = remote.submit(
        cfg, host, spec, slurm.parse_sbatch_options(opts.sbatch), tx.token
    )
    log.info("submitted job %s on %s", job_id, host)
    tx.own_remote(lambda: tx.cancelled or remote.cancel_job(cfg, host, spec.session_id, job_id))
    return job_id, session_dir


def _await_job(
    tx: _Tx,
    job_id: str,
    session_dir: str,
    deadline: float | None,
    squeue_every: Callable[[], float] = lambda: SQUEUE_INTERVAL,
    patient: bool = False,
) -> RemoteServer:
    """Wait for the job's server (until DEADLINE, then cancel the job; None: for as long
    as the job waits), reaching its node once it runs there: through the login host to a
    private socket on the node when our ssh gets there, else to the node's address.
    Slurm is asked every SQUEUE_EVERY() seconds; the server's file is looked for at every
    tick (PATIENT: only once Slurm says the job runs: a job queued for hours costs one
    ssh command per Slurm answer)."""
    opts, cfg, host, sid = tx.opts, tx.cfg, tx.host, tx.session_id
    pool = ThreadPoolExecutor(max_workers=1)
    tx.undo.callback(pool.shutdown, wait=False)
    attempt: Future[Tunnel | None] | None = None
    state = slurm.JobState("PENDING")
    asked = -1e9
    routed = False
    while True:
        # squeue at most every squeue_every() (Slurm's controller is shared); the runtime
        # file, which says the server is up, at every tick.
        ask = time.monotonic() >= asked + squeue_every()
        looked = remote.poll_job(cfg, host, sid, job_id, ask_slurm=ask)
        if looked.job is not None:
            state = looked.job
            asked = time.monotonic()
            tx.queued_seen = tx.queued_seen or (state.queued and bool(state.reason))
        if looked.info is not None:
            break
        node = looked.node or (state.node if state.state == "RUNNING" else "")
        if node and attempt is None:
            # Try the node while the job script starts (it waits for the answer).
            attempt = pool.submit(_try_node, cfg, host, sid, node, tx.logfile)
            tx.undo.callback(_close_untaken, attempt, tx)
        if looked.node and not routed and attempt is not None and state.active:
            # The job runs, and waits to be told how its node is reached.
            opts.progress(f"job {job_id} running on {node}; reaching it")
            _route_to_node(tx, attempt.result())
            routed = True
            continue
        if not state.active or looked.failed:
            raise remote.job_failure(job_id, replace(looked, job=state))
        opts.progress(_job_progress(job_id, state))
        if deadline is not None and time.monotonic() >= deadline:
            raise _timed_out(tx, job_id, state)
        if patient and state.queued:
            # Nothing changes between Slurm's answers (the interval may shorten meanwhile:
            # someone started waiting).
            while time.monotonic() < asked + squeue_every():
                time.sleep(WAIT_TICK)
        else:
            time.sleep(JOB_POLL_INTERVAL)
    info = looked.info
    sock = str(info.get("sock") or "")
    return RemoteServer(
        session_id=sid,
        pid=int(str(info.get("pid", 0))),
        started="",
        cmdline="",
        port=int(str(info.get("port") or 0)),
        sock=sock,
        base_url=str(info.get("base_url") or "/"),
        session_dir=session_dir,
        notebook=opts.notebook,
        version=str(info.get("version", "")),
        job_id=job_id,
        node=looked.node or state.node,
        address="" if sock else looked.address or str(info.get("hostname") or ""),
    )


def _timed_out(tx: _Tx, job_id: str, state: slurm.JobState) -> JlremoteError:
    """--timeout ran out: the job is cancelled (start waited for it, so nobody else will)."""
    last = remote.cancel_job(tx.cfg, tx.host, tx.session_id, job_id)
    tx.cancelled = True
    wait = tx.opts.wait
    if state.queued:
        why = f" (reason: {state.reason})" if state.reason else ""
        msg = (
            f"the job was still pending after {wait:g}s{why}; cancelled it "
            "(--no-wait leaves a job queued)"
        )
    else:
        msg = (
            f"the server in the job did not start within {wait:g}s "
            f"(job {state.state.lower()} on {state.node or '?'}); cancelled it"
        )
    return JlremoteError(msg, ExitCode.SERVER, detail=last.log_tail)


def _try_node(
    cfg: ssh.SshConfig, host: str, session_id: str, node: str, logfile: Path
) -> Tunnel | None:
    """The tunnel's connection to the job's NODE through HOST (keys, host keys and all,
    never a prompt), or None where the cluster does not let our ssh onto the node."""
    try:
        return tunnel.start_master(cfg, host, session_id + "n", logfile, node=node)
    except JlremoteError as exc:
        log.info("no ssh to %s through %s (%s): its server listens on TCP", node, host, exc)
        return None


def _close_untaken(attempt: Future[Tunnel | None], tx: _Tx) -> None:
    """A connection to the node that the session did not take (start failed first)."""
    with contextlib.suppress(Exception):
        tried = attempt.result()
        if tried is not None and tried != tx.master:
            tunnel.close_tunnel(tried)


def _route_to_node(tx: _Tx, node_master: Tunnel | None) -> None:
    """Tell the job how its server is reached: on a private Unix socket on the node when
    NODE_MASTER got there (the session's tunnel then goes there, and the login host's
    connection is closed), else on the node's cluster address, through the login host."""
    remote.set_route(tx.cfg, tx.host, tx.session_id, "tcp" if node_master is None else "sock")
    if node_master is not None:
        assert tx.master is not None
        tunnel.close_tunnel(tx.master)
        tx.own_master(node_master)


def _job_progress(job_id: str, job: slurm.JobState) -> str:
    if job.queued:
        return f"job {job_id} queued{job.notes}"
    if job.state == "RUNNING":
        return f"job {job_id} running on {job.node}; waiting for the server"
    return f"job {job_id} {job.state.lower() or 'submitted'}"


# ---- a job queued with --no-wait -----------------------------------------------------------
#
# `start --no-wait` submits the job and records the session as `queued`: no server, no
# tunnel yet. Its supervisor waits for the job (asking Slurm every QUEUE_POLL seconds, or
# every SQUEUE_INTERVAL while someone waits in `start`/`wait`), finishes the start once it
# runs (complete()) and tells the user with --notify; `start` and `wait` wait for that.

QUEUE_POLL = 10.0
WAIT_TICK = 0.25


def _queue(cfg: ssh.SshConfig, store: StateStore, opts: StartOptions) -> StartResult:
    """Submit the job, record the session as queued, give it its supervisor."""
    _check_app_ports(opts)
    with contextlib.ExitStack() as undo:
        tx = _Tx(cfg, store, opts, undo)
        undo.callback(lambda: lifecycle.release_if_unused(cfg, store, tx.host))
        opts.progress(f"connecting to {tx.host}")
        remote.warm(cfg, tx.host, timeout=cfg.connect_timeout + 15)
        job_id, session_dir = _submit(tx)
        session = Session(
            name=tx.name,
            host=tx.host,
            token=tx.token,
            server=RemoteServer(
                session_id=tx.session_id,
                pid=0,
                started="",
                cmdline="",
                port=0,
                base_url="/",
                session_dir=session_dir,
                notebook=opts.notebook,
                job_id=job_id,
            ),
            tunnel=Tunnel(local_port=opts.local_port or 0, remote_port=0),
            launch_options=launch_options(opts),
            phase="queued",
            notify=opts.notify,
            tty=_own_tty(),
            forwards=tuple(_wanted_apps(opts)),
        )
        with store.transaction() as sessions:
            sessions[tx.name] = session
        undo.callback(_drop_record, store, tx.name, tx.session_id)
        session = _supervise(store, session, fixed=True)
        undo.callback(supervisor.of(session).stop)
        job = _look(cfg, session)
        undo.pop_all()
    return _queued_result(session, job)


def _drop_record(store: StateStore, name: str, session_id: str) -> None:
    with store.transaction() as sessions:
        if name in sessions and sessions[name].server.session_id == session_id:
            del sessions[name]


def _own_tty() -> str:
    """The terminal this command runs on ("" if none): where a bell can reach the user."""
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if stream.isatty():
                return os.ttyname(stream.fileno())
    return ""


def await_queued(
    store: StateStore, name: str, timeout: float | None, progress: Callable[[str], None]
) -> Session:
    """Wait (at most TIMEOUT seconds; None: as long as it takes) until the supervisor of
    NAME's queued job has made it a running session; the job stays queued if it has not.
    The supervisor asks Slurm more often while someone waits here."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen_queued = False
    while True:
        session = store.read().get(name)
        if session is None:
            raise JlremoteError(f"session {name!r} was stopped", ExitCode.NO_SESSION)
        if session.phase == "running":
            if seen_queued and session.notify:
                tell_ready(session, _own_tty())
            return session
        job = session.server.job_id
        if session.phase == "ended":
            raise JlremoteError(f"session {name!r}: {session.ended}", ExitCode.SERVER)
        seen_queued = True
        report = supervisor.read_status(name)
        if report is not None and report.state == "needs login":
            # The host asks for a password or a code: its supervisor may not; here the
            # user is asked (the job stays queued until it runs, as with the supervisor).
            return _complete_here(store, session, progress, deadline)
        if not supervisor.of(session).alive():  # e.g. after a reboot here
            session = _supervise(store, session)
        supervisor.someone_waits(name)
        said = report.detail if report is not None and report.detail else f"job {job} queued"
        progress(said)
        if deadline is not None and time.monotonic() >= deadline:
            raise _still_queued(name, said, timeout)
        time.sleep(WAIT_TICK)


def _still_queued(name: str, said: str, timeout: float | None) -> JlremoteError:
    after = f", still, after {timeout:g}s" if timeout else ", still"
    return JlremoteError(
        f"{said}{after}; it stays queued: `jlremote wait {name}` gives the URL once it "
        f"runs, `jlremote stop {name}` cancels it",
        ExitCode.SERVER,
    )


def _complete_here(
    store: StateStore,
    session: Session,
    progress: Callable[[str], None],
    deadline: float | None,
) -> Session:
    """Watch a queued job from this process and finish its start once it runs, asking
    for the login its supervisor could not (one; the looks at the job keep jlremote's
    connection open). The job stays queued if DEADLINE comes first; the tunnel keeper is
    started once the session runs."""
    cfg = ssh.SshConfig.from_environment()
    progress(f"connecting to {session.host}")
    remote.warm(cfg, session.host, timeout=cfg.connect_timeout + 15)
    while True:
        job = _look(cfg, session)
        if not job.queued:
            return complete(cfg, store, session, supervisor.of(session), progress, lambda: True)
        said = _job_progress(session.server.job_id, job)
        progress(said)
        if deadline is not None and time.monotonic() >= deadline:
            raise _still_queued(session.name, said, None)
        time.sleep(SQUEUE_INTERVAL)


def wait(name: str | None, timeout: float | None, progress: Callable[[str], None]) -> StartResult:
    """`jlremote wait`: block until NAME's URL works (its queued job runs), then give it.
    Never starts a server: a session whose server has gone is an error."""
    store = StateStore(state_dir())
    session = store.pick(name)
    name = session.name
    if session.phase != "running":
        await_queued(store, name, timeout, progress)
    cfg = ssh.SshConfig.from_environment()
    opts = validate(
        StartOptions(
            host=session.host, name=name, slurm=bool(session.server.job_id), progress=progress
        )
    )
    with store.name_lock(name, timeout=60):
        current = store.read().get(name)
        if current is None:
            raise JlremoteError(f"session {name!r} was stopped", ExitCode.NO_SESSION)
        reused = _reuse(cfg, store, current, opts)
    if reused is None:
        raise JlremoteError(
            f"the server of session {name!r} has ended; `jlremote start {session.host}` "
            "starts a new one",
            ExitCode.SERVER,
        )
    return reused


def complete(
    cfg: ssh.SshConfig,
    store: StateStore,
    queued: Session,
    own: Owned,
    report: Callable[[str], None],
    waiting: Callable[[], bool],
) -> Session:
    """The supervisor OWN finishes the start of the QUEUED session once its job runs: the
    tunnel's connection, the route to the node, the forward, the URL verified, the session
    recorded as running. Raises if the job ended (or cannot be reached yet); the job is
    never cancelled here."""
    server = queued.server
    opts = replace(
        validate(
            StartOptions(
                host=queued.host,
                name=queued.name,
                slurm=True,
                notebook=server.notebook,
                local_port=queued.tunnel.local_port or None,
                notify=queued.notify,
            )
        ),
        progress=report,
    )
    with contextlib.ExitStack() as undo:
        tx = _Tx(cfg, store, opts, undo, session_id=server.session_id, token=queued.token)
        tx.own_master(tunnel.start_master(cfg, tx.host, tx.session_id, tx.logfile))
        tx.sup, tx.local_port = own, queued.tunnel.local_port  # (which holds that port)
        found = _await_job(
            tx,
            server.job_id,
            server.session_dir,
            deadline=None,
            squeue_every=lambda: SQUEUE_INTERVAL if waiting() else QUEUE_POLL,
            patient=True,
        )
        return _finish(tx, found, queued=queued)


def job_ended(cfg: ssh.SshConfig, session: Session) -> str:
    """Why SESSION's queued job has ended ("": it has not, or Slurm cannot tell)."""
    sid, job = session.server.session_id, session.server.job_id
    try:
        looked = remote.poll_job(cfg, session.host, sid, job)
    except JlremoteError:
        return ""
    if looked.job is None or (looked.job.active and not looked.failed):
        return ""
    if looked.failed:  # the job script's own error (e.g. jupyter not found on the node)
        return remote.job_failure(job, looked).message
    return slurm.ended_early(looked.job)


def tell_ready(session: Session, tty: str) -> None:
    from jlremote import notify

    where = f" on {session.server.node}" if session.server.node else ""
    notify.tell(
        f"jlremote: {session.name} is ready",
        f"job {session.server.job_id} runs{where}: `jlremote start {session.host}` "
        f"or `jlremote open {session.name}`",
        tty,
    )
