"""`jlremote start`: reuse a live session, or launch a server, forward it and prove it works.

A new session is one transaction (transaction): each thing it acquires (the tunnel's
connection, the supervisor, the server or the job) registers its own undo on an ExitStack
as it is acquired, so a failure anywhere, Ctrl-C included, leaves nothing behind; the
session is recorded only once its URL answers. What differs between a server on the host
and one in a Slurm job is the backend's launch (_launch_plain, in_job).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

from jlremote import loopback, remote, slurm, ssh, supervision, tunnel
from jlremote import session as lifecycle
from jlremote.errors import ExitCode, JlremoteError
from jlremote.launch import (
    Started,
    Transaction,
    in_job,
    plain,
    submit,
    transaction,
    wanted_apps,
)
from jlremote.options import StartOptions, Transport, launch_options, validate
from jlremote.paths import state_dir
from jlremote.queued import await_queued, look, own_tty, tell_ready
from jlremote.results import StartResult
from jlremote.scripts import Rc
from jlremote.state import RemoteServer, Session, StateStore, Tunnel

log = logging.getLogger(__name__)

# How often a starting job's server is looked for (a file test through the shared ssh
# connection), and how often squeue is asked about the job.


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
                    return _queued_result(existing, look(cfg, existing))
            else:
                reused = reuse(cfg, store, existing, opts)
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


def _check_app_ports(opts: StartOptions) -> None:
    """The local ports --forward names must be free (and not --local-port)."""
    for app in wanted_apps(opts):
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
    for app in wanted_apps(opts):
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
    apps = lifecycle.apps(session, ask=False)
    return [{k: v for k, v in a.items() if k != "answers"} for a in apps]


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


# ---- a live session ---------------------------------------------------------------------


def reuse(
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
        if not supervision.of(session).alive():
            fixed = opts.local_port is not None and opts.local_port == session.tunnel.local_port
            session = lifecycle.supervise(store, session, fixed=fixed)
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
    if not supervision.holds_port(session):
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
    started = _launch(cfg, store, opts)
    if started.waited and opts.notify:
        tell_ready(started.session, own_tty())
    return _result(started.session, reused=False, reopened=False, attached=started.attached)


def _launch(cfg: ssh.SshConfig, store: StateStore, opts: StartOptions) -> Started:
    """The transaction with the backend OPTS ask for (a socket that cannot work here: TCP)."""
    if opts.slurm:
        return transaction(cfg, store, opts, in_job)
    if opts.transport != Transport.AUTO:
        return transaction(cfg, store, opts, plain(opts.transport.value))
    if opts.port is not None:  # a remote port was asked for: that is TCP
        return transaction(cfg, store, opts, plain("tcp"))
    try:
        return transaction(cfg, store, opts, plain("socket"))
    except JlremoteError as exc:
        if not _socket_unsupported(exc):
            raise
        log.info("the socket transport did not work on %s (%s); using TCP", opts.host, exc.message)
        return transaction(cfg, store, opts, plain("tcp"))


def _socket_unsupported(exc: JlremoteError) -> bool:
    """Did the socket transport fail for a reason TCP avoids? (an old jupyter_server with no
    --sock, a socket path too long, or an sshd with stream-local forwarding turned off)"""
    if exc.remote_code == Rc.NO_SOCKET:
        return True
    text = (exc.message + "\n" + exc.detail).lower()  # ssh's own words
    return exc.code == ExitCode.TUNNEL and ("prohibited" in text or "open failed" in text)


# ---- backends: what differs between a server on the host and one in a job ------------------


# ---- a job queued with --no-wait -----------------------------------------------------------
#
# `start --no-wait` submits the job and records the session as `queued`: no server, no
# tunnel yet. Its supervisor waits for the job (asking Slurm every QUEUE_POLL seconds, or
# every SQUEUE_INTERVAL while someone waits in `start`/`wait`), finishes the start once it
# runs (complete()) and tells the user with --notify; `start` and `wait` wait for that.


def _queue(cfg: ssh.SshConfig, store: StateStore, opts: StartOptions) -> StartResult:
    """Submit the job, record the session as queued, give it its supervision."""
    _check_app_ports(opts)
    with contextlib.ExitStack() as undo:
        tx = Transaction(cfg, store, opts, undo)
        undo.callback(lambda: lifecycle.release_if_unused(cfg, store, tx.host))
        opts.progress(f"connecting to {tx.host}")
        remote.warm(cfg, tx.host, timeout=cfg.connect_timeout + 15)
        job_id, session_dir = submit(tx)
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
            tty=own_tty(),
            forwards=tuple(wanted_apps(opts)),
        )
        with store.transaction() as sessions:
            sessions[tx.name] = session
        undo.callback(_drop_record, store, tx.name, tx.session_id)
        session = lifecycle.supervise(store, session, fixed=True)
        undo.callback(supervision.of(session).stop)
        job = look(cfg, session)
        undo.pop_all()
    return _queued_result(session, job)


def _drop_record(store: StateStore, name: str, session_id: str) -> None:
    with store.transaction() as sessions:
        if name in sessions and sessions[name].server.session_id == session_id:
            del sessions[name]
