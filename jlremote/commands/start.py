"""`jlremote start`: reuse a live session, or launch a server, forward it and prove it works."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from jlremote import remote, scripts, slurm, ssh, supervisor, tunnel
from jlremote.errors import ExitCode, JlremoteError
from jlremote.paths import ensure_private_dir, state_dir
from jlremote.results import StartResult
from jlremote.state import RemoteServer, Session, StateStore, Tunnel

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,99}")

# Seconds `start` waits by default: for the server to come up, and with --slurm also for
# the job to leave the queue.
DEFAULT_TIMEOUT = 60.0
DEFAULT_SLURM_TIMEOUT = 300.0
# How often a starting job's server is looked for (a file test through the shared ssh
# connection), and how often squeue is asked about the job.
JOB_POLL_INTERVAL = 0.1
SQUEUE_INTERVAL = 1.0

Progress = Callable[[str], None]


def _quiet(_step: str) -> None:
    pass


@dataclass(frozen=True)
class StartOptions:
    """Everything `start` was asked for."""

    host: str
    name: str | None = None
    notebook: bool = False
    port: int | None = None
    local_port: int | None = None
    directory: str | None = None
    env: str | None = None
    jupyter: str = "jupyter"
    allow_root: bool = False
    timeout: float | None = None  # None: DEFAULT_TIMEOUT (DEFAULT_SLURM_TIMEOUT with slurm)
    transport: str = "auto"  # auto | socket | tcp
    attach: bool = False  # only attach to a server of this name already on the remote
    slurm: bool = False  # run the server in a Slurm batch job; HOST is the login host
    sbatch: str = ""  # extra sbatch options (shell-like words)
    # Told each step as it begins (a live line on a terminal); not a launch option.
    progress: Progress = field(default=_quiet, compare=False)

    @property
    def wait(self) -> float:
        if self.timeout is not None:
            return self.timeout
        return DEFAULT_SLURM_TIMEOUT if self.slurm else DEFAULT_TIMEOUT


def launch_options(opts: StartOptions) -> str:
    """The options that shape a new server, as a canonical string."""
    options: dict[str, object] = {
        "notebook": opts.notebook,
        "port": opts.port,
        "dir": opts.directory,
        "env": opts.env,
        "jupyter": opts.jupyter,
        "allow_root": opts.allow_root,
        "transport": opts.transport,
    }
    if opts.slurm:  # absent otherwise, so that older records still compare equal
        options.update(slurm=True, sbatch=opts.sbatch)
    return json.dumps(options, sort_keys=True)


def check_name(name: str) -> str:
    """Session names go into file names and tables: keep them plain."""
    if not _NAME.fullmatch(name):
        raise JlremoteError(
            f"not a valid session name: {name!r} (letters, digits and ._@:+- only)",
            ExitCode.USAGE,
        )
    return name


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
    )


def start(opts: StartOptions) -> StartResult:
    """Give the user a working URL for OPTS.host, starting as little as possible."""
    host = ssh.check_host(opts.host)
    name = check_name(opts.name or host)
    if opts.local_port is not None and not 1 <= opts.local_port <= 65535:
        raise JlremoteError(f"--local-port {opts.local_port} is not a port", ExitCode.USAGE)
    if opts.port is not None and not 1 <= opts.port <= 65535:
        raise JlremoteError(f"--port {opts.port} is not a port", ExitCode.USAGE)
    if opts.transport not in ("auto", "socket", "tcp"):
        raise JlremoteError(
            f"--transport must be auto, socket or tcp, not {opts.transport!r}", ExitCode.USAGE
        )
    if opts.transport == "socket" and opts.port is not None:
        raise JlremoteError("--port makes no sense with --transport socket", ExitCode.USAGE)
    if opts.sbatch and not opts.slurm:
        raise JlremoteError("--sbatch needs --slurm", ExitCode.USAGE)
    if opts.slurm:
        for given, what in (
            (opts.port is not None, "--port (the job picks a free port on its node)"),
            (opts.transport == "socket", "--transport socket (the node is another machine)"),
            (opts.attach, "--attach"),
        ):
            if given:
                raise JlremoteError(f"--slurm does not go with {what}", ExitCode.USAGE)
        slurm.parse_sbatch_options(opts.sbatch)  # refuse bad options before connecting
    if opts.wait <= 0:
        raise JlremoteError("--timeout must be more than 0 seconds", ExitCode.USAGE)
    opts = replace(opts, timeout=opts.wait)
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
            if existing.launch_options and existing.launch_options != launch_options(opts):
                log.warning(
                    "session %r is already running with other options; reusing it as it is "
                    "(stop it first to start it with the new ones)",
                    name,
                )
            reused = _reuse(cfg, store, existing, opts)
            if reused is not None:
                return reused
        return _fresh(cfg, store, name, host, opts)


def _reuse(
    cfg: ssh.SshConfig, store: StateStore, session: Session, opts: StartOptions
) -> StartResult | None:
    """Same URL for a live session (re-opening its tunnel if needed); None if it is gone.

    Through a Unix socket in the session's private directory, our token answering proves
    the far end is still our server, so the usual path needs no remote command at all. A
    TCP port is proven first to still be the server's own (through the tunnel's own
    connection): another user may listen on a dead server's port and answer anything.
    """
    alive = tunnel.tunnel_process(session.tunnel) is not None
    if alive and remote.needs_proof(session.server):
        try:
            remote.prove_serving(cfg, session.host, session.server, session.tunnel.control_path)
        except JlremoteError as exc:
            if exc.code != ExitCode.SERVER:
                raise
            _forget_gone(cfg, store, session)
            return None
    if (
        alive
        and tunnel.api_status(
            session.tunnel.local_port, session.server.base_url, session.token, timeout=3.0
        )
        is not None
    ):
        log.debug("session %s is alive; reusing it", session.name)
        if supervisor.process_of(session) is None:  # e.g. after a local reboot
            session = _supervise(store, session)
        return _result(session, reused=True, reopened=False)
    # We re-open the tunnel ourselves, now: its supervisor (if any) steps aside.
    opts.progress(f"re-opening the tunnel to {session.host}")
    supervisor.stop(session)
    tunnel.close_tunnel(session.tunnel)
    local_port = session.tunnel.local_port
    if not tunnel.port_is_free(local_port):
        if opts.local_port is not None and opts.local_port == local_port:
            tunnel.require_free_port(local_port)
        local_port = opts.local_port or tunnel.pick_free_port()
        log.warning(
            "local port %d is taken now; the session moves to port %d",
            session.tunnel.local_port,
            local_port,
        )
    try:
        new_tunnel = _open_and_verify(cfg, session.host, session, local_port, timeout=5.0)
    except JlremoteError as exc:
        if exc.code in (ExitCode.CONNECT, ExitCode.AUTH, ExitCode.NO_SSH, ExitCode.LOCAL_PORT):
            raise
        if exc.code != ExitCode.SERVER:  # SERVER: the re-open's own check found it gone
            # No answer: the server may be gone. Ask the remote whether it is still ours.
            probe_timeout = cfg.connect_timeout + 15
            state = remote.probe(cfg, session.host, [session.server], timeout=probe_timeout)
            if state.get(session.server.session_id) == "running":
                raise
        _forget_gone(cfg, store, session)
        return None
    session = replace(session, tunnel=new_tunnel)
    with store.transaction() as sessions:
        sessions[session.name] = session
    session = _supervise(store, session)
    return _result(session, reused=True, reopened=True)


def _forget_gone(cfg: ssh.SshConfig, store: StateStore, session: Session) -> None:
    """The session's server is gone: its supervisor, tunnel, remote directory and record
    go too (so that `start` starts a new one)."""
    log.info("the server of session %s is gone; starting a new one", session.name)
    supervisor.stop(session)
    tunnel.close_tunnel(session.tunnel)
    # Its session directory is garbage now; stop_script removes it (the recorded process,
    # if it still lives, is ours: it goes too).
    remote.stop(cfg, session.host, remote.identity(session.server), grace=0)
    with store.transaction() as sessions:
        sessions.pop(session.name, None)


def _supervise(store: StateStore, session: Session) -> Session:
    """Give SESSION a supervisor that keeps its tunnel up, and record it."""
    pid, created = supervisor.spawn(session.name)
    session = replace(session, supervisor_pid=pid, supervisor_created=created)
    with store.transaction() as sessions:
        if session.name in sessions:
            sessions[session.name] = replace(
                sessions[session.name], supervisor_pid=pid, supervisor_created=created
            )
    return session


def _tunnel_log(name: str) -> Path:
    return ensure_private_dir(state_dir() / "logs") / f"{name}.tunnel.log"


def _open_and_verify(
    cfg: ssh.SshConfig, host: str, session: Session, local_port: int, timeout: float
) -> Tunnel:
    logfile = _tunnel_log(session.name)
    t = tunnel.open_tunnel(
        cfg,
        host,
        session.server.session_id,
        local_port,
        session.server.target,
        logfile,
        check=remote.proof_of(cfg, host, session.server),
        node=session.tunnel.node,
    )
    try:
        tunnel.wait_for_api(local_port, session.server.base_url, session.token, timeout, logfile)
    except BaseException:
        tunnel.close_tunnel(t)
        raise
    return t


def _master_and_helpers(
    cfg: ssh.SshConfig, host: str, session_id: str, logfile: Path, name: str, wait: float
) -> tuple[Tunnel, tuple[int, float]]:
    """While the server boots: the tunnel's connection, the imports verification needs,
    and the supervisor (it waits until the session's record names it)."""
    master = tunnel.start_master(cfg, host, session_id, logfile)
    tunnel.preload()
    return master, supervisor.spawn(name, wait)


def _launch_spec(opts: StartOptions, name: str, transport: str) -> scripts.LaunchSpec:
    """A new server, with a new session id, as OPTS asks."""
    return scripts.LaunchSpec(
        session_id=secrets.token_hex(8),
        notebook=opts.notebook,
        port=opts.port,
        directory=opts.directory,
        env=opts.env,
        jupyter=opts.jupyter,
        allow_root=opts.allow_root,
        timeout=opts.wait,
        transport=transport,
        name=name,
        attach_only=opts.attach,
    )


def _new_session(
    opts: StartOptions,
    name: str,
    host: str,
    token: str,
    server: RemoteServer,
    master: Tunnel,
    sup: tuple[int | None, float | None],
) -> Session:
    return Session(
        name=name,
        host=host,
        token=token,
        server=server,
        tunnel=master,
        launch_options=launch_options(opts),
        supervisor_pid=sup[0],
        supervisor_created=sup[1],
    )


def _verify_and_record(
    store: StateStore, session: Session, opts: StartOptions, timeout: float, logfile: Path
) -> Session:
    """The URL must answer with the token through the tunnel; only then is it recorded."""
    opts.progress("verifying the URL")
    tunnel.wait_for_api(
        session.tunnel.local_port,
        session.server.base_url,
        session.token,
        timeout=timeout,
        log_path=logfile,
    )
    with store.transaction() as sessions:
        sessions[session.name] = session
    return session


def _undo(
    cfg: ssh.SshConfig,
    store: StateStore,
    name: str,
    host: str,
    sup: tuple[int | None, float | None],
    master: Tunnel | None,
    remote_cleanup: Callable[[], object] | None,
) -> None:
    """After a failed start: its supervisor and its tunnel go, then what it started on
    the remote (REMOTE_CLEANUP), then jlremote's control connection if no other session
    uses the host (in that order: the cleanup needs the connection)."""
    supervisor.stop_process(name, *sup)
    if master is not None:
        tunnel.close_tunnel(master)
    if remote_cleanup is not None:
        with contextlib.suppress(Exception):
            remote_cleanup()
    if not any(s.host == host for s in store.read().values()):
        with contextlib.suppress(Exception):
            remote.release(cfg, host)


def _socket_unsupported(exc: JlremoteError) -> bool:
    """Did the socket transport fail for a reason TCP avoids? (an old jupyter_server with no
    --sock, a socket path too long, or an sshd with stream-local forwarding turned off)"""
    text = (exc.message + "\n" + exc.detail).lower()
    if exc.code == ExitCode.SERVER:
        return "sock" in text
    return exc.code == ExitCode.TUNNEL and ("prohibited" in text or "open failed" in text)


def _fresh(
    cfg: ssh.SshConfig, store: StateStore, name: str, host: str, opts: StartOptions
) -> StartResult:
    if opts.local_port is not None:
        tunnel.require_free_port(opts.local_port)
    if opts.slurm:
        return _fresh_slurm(cfg, store, name, host, opts)
    if opts.transport != "auto":
        return _fresh_with(cfg, store, name, host, opts, opts.transport)
    if opts.port is not None:  # a remote port was asked for: that is TCP
        return _fresh_with(cfg, store, name, host, opts, "tcp")
    try:
        return _fresh_with(cfg, store, name, host, opts, "socket")
    except JlremoteError as exc:
        if not _socket_unsupported(exc):
            raise
        log.info("the socket transport did not work on %s (%s); using TCP", host, exc.message)
        return _fresh_with(cfg, store, name, host, opts, "tcp")


def _fresh_with(
    cfg: ssh.SshConfig,
    store: StateStore,
    name: str,
    host: str,
    opts: StartOptions,
    transport: str,
) -> StartResult:
    spec = _launch_spec(opts, name, transport)
    token = secrets.token_hex(24)
    logfile = _tunnel_log(name)
    server: RemoteServer | None = None
    master: Tunnel | None = None
    sup: tuple[int | None, float | None] = (None, None)  # the supervisor: PID, create time
    try:
        # Authenticate once (this may prompt), then overlap: the server starts through the
        # shared connection while the tunnel's own connection is being made.
        opts.progress(f"connecting to {host}")
        remote.warm(cfg, host, timeout=cfg.connect_timeout + 15)
        opts.progress(f"launching {spec.subcommand} on {host}, waiting for the server")
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(
                _master_and_helpers, cfg, host, spec.session_id, logfile, name, opts.wait + 60
            )
            try:
                launched = remote.launch(cfg, host, spec, token)
            finally:
                # Whatever happened, own the master and the supervisor so that they can go.
                if pending.exception() is None:
                    master, sup = pending.result()
        server = launched.server
        if master is None:
            raise pending.exception() or AssertionError("no tunnel master")
        local_port = opts.local_port or tunnel.pick_free_port()
        opts.progress(f"forwarding 127.0.0.1:{local_port}")
        if launched.attached_token is not None:
            # Another client's server: not ours to stop if attaching fails here, and the
            # tunnel's master must be named after that session.
            found, server = launched.server, None
            token = launched.attached_token
            tunnel.close_tunnel(master)
            master = None
            master = tunnel.open_tunnel(
                cfg,
                host,
                found.session_id,
                local_port,
                found.target,
                logfile,
                check=remote.proof_of(cfg, host, found),
            )
        else:
            found = server
            log.debug("server pid %d listens on remote port %d", found.pid, found.port)
            master = tunnel.add_forward(cfg, host, master, local_port, found.target)
        session = _verify_and_record(
            store,
            _new_session(opts, name, host, token, found, master, sup),
            opts,
            min(opts.wait, 30.0),
            logfile,
        )
    except BaseException:
        # Nothing half-done stays behind: the supervisor, the tunnel and the server.
        stop_remote = None
        if server is not None:
            stop_remote = functools.partial(remote.stop, cfg, host, remote.identity(server), 5)
        _undo(cfg, store, name, host, sup, master, stop_remote)
        raise
    return _result(
        session, reused=False, reopened=False, attached=launched.attached_token is not None
    )


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


def _route_to_node(
    cfg: ssh.SshConfig, host: str, session_id: str, node_master: Tunnel | None, master: Tunnel
) -> Tunnel:
    """Tell the job how its server is reached: on a private Unix socket on the node when
    NODE_MASTER got there, else on the node's cluster address, forwarded through HOST's
    MASTER. Returns the master to forward through (the other one is closed)."""
    try:
        remote.set_route(cfg, host, session_id, "tcp" if node_master is None else "sock")
    except BaseException:
        if node_master is not None:
            tunnel.close_tunnel(node_master)
        raise
    if node_master is None:
        return master
    tunnel.close_tunnel(master)  # the login host's connection is not needed any more
    return node_master


def _job_progress(job_id: str, job: slurm.JobState) -> str:
    if job.state == "PENDING":
        return f"job {job_id} queued" + (f" ({job.reason})" if job.reason else "")
    if job.state == "RUNNING":
        return f"job {job_id} running on {job.node}; waiting for the server"
    return f"job {job_id} {job.state.lower() or 'submitted'}"


def _fresh_slurm(
    cfg: ssh.SshConfig, store: StateStore, name: str, host: str, opts: StartOptions
) -> StartResult:
    """Run the server in a batch job submitted on the login host HOST, wait for it (queue
    and start-up both count against --timeout), forward to NODE:PORT through HOST."""
    deadline = time.monotonic() + opts.wait
    spec = _launch_spec(opts, name, "tcp")  # the job serves on its node's address
    job = slurm.JobSpec(spec, slurm.parse_sbatch_options(opts.sbatch))
    token = secrets.token_hex(24)
    logfile = _tunnel_log(name)
    job_id = ""
    master: Tunnel | None = None
    sup: tuple[int | None, float | None] = (None, None)
    attempt: Future[Tunnel | None] | None = None
    routed = False
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        opts.progress(f"connecting to {host}")
        remote.warm(cfg, host, timeout=cfg.connect_timeout + 15)
        opts.progress("submitting the job")
        job_id, session_dir = remote.submit(cfg, host, job, token)
        log.info("submitted job %s on %s", job_id, host)
        # While the job waits in the queue: the tunnel's own connection to the login host.
        master, sup = _master_and_helpers(cfg, host, spec.session_id, logfile, name, opts.wait + 60)
        state = slurm.JobState("PENDING")
        ask_at = 0.0
        while True:
            # squeue at most every SQUEUE_INTERVAL (Slurm's controller is shared); the
            # runtime file, which says the server is up, at every tick.
            ask = time.monotonic() >= ask_at
            looked = remote.poll_job(cfg, host, spec.session_id, job_id, ask_slurm=ask)
            if looked.poll.job is not None:
                state = looked.poll.job
                ask_at = time.monotonic() + SQUEUE_INTERVAL
            if looked.poll.info is not None:
                break
            node = looked.poll.node or (state.node if state.state == "RUNNING" else "")
            if node and attempt is None:
                # Try the node while the job script starts (it waits for the answer).
                attempt = pool.submit(_try_node, cfg, host, spec.session_id, node, logfile)
            # (A job that has ended already is reported below, from this poll's log tail.)
            if looked.poll.node and not routed and attempt is not None and state.active:
                # The job runs, and waits to be told how its node is reached.
                opts.progress(f"job {job_id} running on {node}; reaching it")
                master = _route_to_node(cfg, host, spec.session_id, attempt.result(), master)
                routed = True
                continue
            if not state.active:
                raise remote.job_failure(job_id, state, looked.log_tail)
            opts.progress(_job_progress(job_id, state))
            if time.monotonic() >= deadline:
                last = remote.cancel_job(cfg, host, spec.session_id, job_id)
                job_id = ""  # cancelled: nothing left to clean up on the remote
                if state.state == "PENDING":
                    why = f" (reason: {state.reason})" if state.reason else ""
                    msg = f"the job was still pending after {opts.wait:g}s{why}; cancelled it"
                else:
                    msg = (
                        f"the server in the job did not start within {opts.wait:g}s "
                        f"(job {state.state.lower()} on {state.node or '?'}); cancelled it"
                    )
                raise JlremoteError(msg, ExitCode.SERVER, detail=last.log_tail)
            time.sleep(JOB_POLL_INTERVAL)
        info = looked.poll.info
        sock = str(info.get("sock") or "")
        address = "" if sock else looked.poll.address or str(info.get("hostname") or "")
        server = RemoteServer(
            session_id=spec.session_id,
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
            node=looked.poll.node or state.node,
            address=address,
        )
        opts.progress(
            f"forwarding to a private socket on {server.node}"
            if sock
            else f"forwarding to {server.node}:{server.port} through {host}"
        )
        local_port = opts.local_port or tunnel.pick_free_port()
        master = tunnel.add_forward(cfg, host, master, local_port, server.target)
        session = _new_session(opts, name, host, token, server, master, sup)
        wait = max(5.0, min(30.0, deadline - time.monotonic()))
        _verify_and_record(store, session, opts, wait, logfile)
    except BaseException:
        if attempt is not None and not routed:  # a connection to the node nobody took
            with contextlib.suppress(Exception):
                tried = attempt.result()
                if tried is not None:
                    tunnel.close_tunnel(tried)
        cancel = None
        if job_id:
            cancel = functools.partial(remote.cancel_job, cfg, host, spec.session_id, job_id)
        _undo(cfg, store, name, host, sup, master, cancel)
        raise
    finally:
        pool.shutdown(wait=False)
    return _result(session, reused=False, reopened=False)
