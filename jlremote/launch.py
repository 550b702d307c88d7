"""A new session's launch: one transaction (transaction()). Each thing it acquires (the
tunnel's connection, the supervisor, the server or the job) registers its own undo on an
ExitStack as it is acquired, so a failure anywhere, Ctrl-C included, leaves nothing
behind; the session is recorded only once its URL answers. What differs between a server
on the host and one in a Slurm job is the backend (plain(), in_job()). `start` runs it
for a new server; the supervisor of a queued job finishes one with finish() (queued.py).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from jlremote import keeper, remote, scripts, slurm, ssh, supervision, tunnel, untrusted
from jlremote import session as lifecycle
from jlremote.errors import ExitCode, JlremoteError
from jlremote.options import StartOptions, launch_options, parse_forwards, seconds
from jlremote.proc import Owned
from jlremote.state import AppForward, RemoteServer, Session, StateStore, Tunnel

log = logging.getLogger(__name__)

# How often a starting job's server is looked for (a file test through the shared ssh
# connection), and how often squeue is asked about the job.
JOB_POLL_INTERVAL = 0.1


SQUEUE_INTERVAL = 1.0


WAIT_TICK = 0.25


@dataclass(frozen=True)
class Started:
    """What a transaction launched: the recorded session, whether it is another
    client's server attached to, and whether its job had to wait in the queue."""

    session: Session
    attached: bool = False
    waited: bool = False


def wanted_apps(opts: StartOptions) -> list[AppForward]:
    """The --forward apps (local port 0: a free one, picked when forwarded)."""
    return parse_forwards(opts.forwards or [])


@dataclass
class Transaction:
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
        self.own_supervisor(supervision.spawn(self.name, self.listener, self.opts.wait + 60))
        self.listener.close()  # (the supervisor's copy holds the port)


Backend = Callable[[Transaction], RemoteServer]


def transaction(
    cfg: ssh.SshConfig, store: StateStore, opts: StartOptions, backend: Backend
) -> Started:
    """Connect, launch (BACKEND), forward, verify, record: all of it, or nothing."""
    with contextlib.ExitStack() as undo:
        tx = Transaction(cfg, store, opts, undo)
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
        session = finish(tx, server)
    return Started(session, attached=tx.attached, waited=tx.queued_seen)


def finish(tx: Transaction, server: RemoteServer, queued: Session | None = None) -> Session:
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
    wanted = list(queued.forwards) if queued is not None else wanted_apps(opts)
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


def plain(transport: str) -> Backend:
    return lambda tx: _launch_plain(tx, transport)


def _launch_plain(tx: Transaction, transport: str) -> RemoteServer:
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


def in_job(tx: Transaction) -> RemoteServer:
    """Run the server in a batch job submitted on the login host, wait for it (queue and
    start-up both count against --timeout; then it is cancelled), and reach its node."""
    job_id, session_dir = submit(tx)
    # While the job waits in the queue: the tunnel's own connection to the login host.
    tx.connect_and_supervise()
    return await_job(tx, job_id, session_dir, deadline=time.monotonic() + tx.opts.wait)


def submit(tx: Transaction) -> tuple[str, str]:
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


def await_job(
    tx: Transaction,
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
        opts.progress(job_progress(job_id, state))
        if deadline is not None and time.monotonic() >= deadline:
            raise _timed_out(tx, job_id, state)
        _pause(patient and state.queued, asked, squeue_every)
    return _server_in_job(tx, job_id, session_dir, looked, state)


def _pause(patient: bool, asked: float, squeue_every: Callable[[], float]) -> None:
    """Until the next look at the job: a tick, or (PATIENT: it waits in the queue, and
    nothing changes between Slurm's answers) until Slurm is asked again, an interval
    that may shorten meanwhile (someone started waiting)."""
    if not patient:
        time.sleep(JOB_POLL_INTERVAL)
        return
    while time.monotonic() < asked + squeue_every():
        time.sleep(WAIT_TICK)


def _server_in_job(
    tx: Transaction, job_id: str, session_dir: str, looked: remote.JobPoll, state: slurm.JobState
) -> RemoteServer:
    """The job's server, as its runtime file (on the shared home) says it: every value
    checked (untrusted), as the node's own words."""
    info = looked.info or {}
    sid = tx.session_id
    sock = untrusted.socket_path(str(info.get("sock") or ""), tx.name)
    port = str(info.get("port") or 0)
    hostname = str(info.get("hostname") or "")
    pid = str(info.get("pid") or 0)
    return RemoteServer(
        session_id=sid,
        pid=untrusted.number(pid, tx.name) if pid != "0" else 0,
        started="",
        cmdline="",
        port=untrusted.port(port, tx.name) if port != "0" else 0,
        sock=sock,
        base_url=untrusted.url_path(str(info.get("base_url") or "/"), tx.name),
        session_dir=session_dir,
        notebook=tx.opts.notebook,
        version=untrusted.text(str(info.get("version", "")), 40),
        job_id=job_id,
        node=looked.node or state.node,
        address=""
        if sock
        else looked.address or (untrusted.remote_host(hostname, tx.name) if hostname else ""),
    )


def _timed_out(tx: Transaction, job_id: str, state: slurm.JobState) -> JlremoteError:
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


def _close_untaken(attempt: Future[Tunnel | None], tx: Transaction) -> None:
    """A connection to the node that the session did not take (start failed first)."""
    with contextlib.suppress(Exception):
        tried = attempt.result()
        if tried is not None and tried != tx.master:
            tunnel.close_tunnel(tried)


def _route_to_node(tx: Transaction, node_master: Tunnel | None) -> None:
    """Tell the job how its server is reached: on a private Unix socket on the node when
    NODE_MASTER got there (the session's tunnel then goes there, and the login host's
    connection is closed), else on the node's cluster address, through the login host."""
    remote.set_route(tx.cfg, tx.host, tx.session_id, "tcp" if node_master is None else "sock")
    if node_master is not None:
        assert tx.master is not None
        tunnel.close_tunnel(tx.master)
        tx.own_master(node_master)


def job_progress(job_id: str, job: slurm.JobState) -> str:
    if job.queued:
        return f"job {job_id} queued{job.notes}"
    if job.state == "RUNNING":
        return f"job {job_id} running on {job.node}; waiting for the server"
    return f"job {job_id} {job.state.lower() or 'submitted'}"
