"""Things done on the remote: each is one `ssh HOST -- <script>` (scripts.py), read back
by protocol.py; the scripts' exit codes become jlremote's in one table, OUTCOMES."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from jlremote import options, proc, protocol, scripts, slurm, ssh, untrusted
from jlremote.errors import ExitCode, JlremoteError, Reason
from jlremote.scripts import Rc
from jlremote.state import RemoteServer, Tunnel

log = logging.getLogger(__name__)

_ON_PATH = (
    "put it on PATH with --env (e.g. 'source ~/venv/bin/activate' or 'module load python'), "
    "or give --jupyter /path/to/jupyter"
)

# What each exit code of a remote script means to the user: jlremote's exit code, and a
# hint added to the script's own message. Codes not listed keep the caller's default.
OUTCOMES: dict[int, tuple[ExitCode, str]] = {
    Rc.SESSION_DIR: (ExitCode.REMOTE_ENV, ""),
    Rc.NO_TOKEN: (ExitCode.SERVER, ""),
    Rc.ENV_FAILED: (ExitCode.REMOTE_ENV, ""),
    Rc.NO_DIR: (ExitCode.REMOTE_ENV, ""),
    Rc.SERVER_EXITED: (ExitCode.SERVER, ""),
    Rc.SERVER_TIMEOUT: (ExitCode.SERVER, ""),
    Rc.NO_ENTRY: (ExitCode.NO_SESSION, ""),
    Rc.NO_SBATCH: (ExitCode.REMOTE_ENV, ""),
    Rc.SBATCH_FAILED: (ExitCode.REMOTE_ENV, ""),
    Rc.NO_SUBCOMMAND: (
        ExitCode.REMOTE_ENV,
        "pip install jupyterlab there (notebook, for --notebook), or point --env/--jupyter at "
        "an environment that has it",
    ),
    Rc.NEEDS_ROOT: (ExitCode.SERVER, "it refuses to run as root without --allow-root"),
    Rc.NO_SOCKET: (ExitCode.SERVER, ""),
    Rc.SLURM_SILENT: (ExitCode.ERROR, ""),
    Rc.ELSEWHERE: (ExitCode.CONNECT, ""),
    Rc.NO_PYTHON: (ExitCode.REMOTE_ENV, ""),
    Rc.INSTALL_FAILED: (ExitCode.REMOTE_ENV, ""),
    Rc.IN_USE: (ExitCode.REMOTE_ENV, ""),
    Rc.NOT_FOUND: (ExitCode.REMOTE_ENV, _ON_PATH),
}


def remote_message(stderr: str, fallback: str) -> tuple[str, str]:
    """Our script's own `jlremote: ...` line (the message) and what followed it (detail)."""
    lines = stderr.strip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("jlremote: "):
            return line[len("jlremote: ") :], "\n".join(lines[i + 1 :])
    return fallback, "\n".join(lines[-scripts.LOG_TAIL_LINES :])


def failure(
    rc: int, said: str, fallback: str, default: ExitCode, prefix: str = ""
) -> JlremoteError:
    """The error for a script that exited with RC, having SAID (its stderr) so."""
    msg, detail = remote_message(said, fallback)
    code, hint = OUTCOMES.get(rc, (default, ""))
    text = prefix + msg + (f" ({hint})" if hint else "")
    return JlremoteError(text, code, detail=detail, remote_code=rc)


def run_script(
    cfg: ssh.SshConfig,
    host: str,
    script: scripts.Script,
    timeout: float,
    what: str,
    stdin_text: str | bytes | None = None,
    via: str = "",
) -> proc.Completed:
    """Run SCRIPT on HOST through jlremote's shared connection (or, with VIA, through the
    tunnel's own master at that path: no login of its own)."""
    command = script.command()
    if via:
        argv = ssh.via_master_argv(cfg, host, via, command)
    else:
        argv = ssh.command_argv(cfg, host, command)
    done = proc.run(argv, timeout=timeout, stdin_text=stdin_text, what=what)
    if done.returncode == 255:
        raise ssh.explain_failure(host, done.stderr)
    return done


def ask(
    cfg: ssh.SshConfig,
    host: str,
    script: scripts.Script,
    timeout: float,
    what: str,
    default: ExitCode,
    stdin_text: str | None = None,
    via: str = "",
) -> protocol.Reply:
    """run_script, then its reply; a failed script is an error (OUTCOMES, else DEFAULT)."""
    done = run_script(cfg, host, script, timeout, what, stdin_text, via)
    if done.returncode != 0:
        raise failure(
            done.returncode, done.stderr, f"{what} failed (exit {done.returncode})", default
        )
    return protocol.parse(done.stdout)


def warm(cfg: ssh.SshConfig, host: str, timeout: float) -> None:
    """Open (or reuse) jlremote's control connection to HOST: the one place that may ask
    for a password or 2FA, before anything runs in parallel."""
    done = proc.run(
        ssh.command_argv(cfg, host, "true"), timeout=timeout, what=f"connecting to {host}"
    )
    if done.returncode == 255:
        raise ssh.explain_failure(host, done.stderr)


def warm_or_ask(cfg: ssh.SshConfig, host: str, timeout: float) -> bool:
    """jlremote's control connection to HOST without a prompt (keys, an agent): True. A
    host that asks for a password or a code: False, nothing asked yet (its one login is
    then the tunnel's own connection). Anything else that needs the user (a key's
    passphrase) is asked here, as before."""
    try:
        warm(replace(cfg, batch=True), host, timeout)
        return True
    except JlremoteError as exc:
        if exc.needs_user:
            return False
        if exc.code != ExitCode.AUTH:
            raise
    warm(cfg, host, timeout)
    return True


def hello(cfg: ssh.SshConfig, host: str, timeout: float, via: str = "") -> tuple[str, str]:
    """Which login node a connection to HOST (with VIA: the master at that path) reaches,
    as `NAME BOOT_ID`, and at which address."""
    reply = ask(
        cfg, host, scripts.hello(), timeout, f"connecting to {host}", ExitCode.CONNECT, via=via
    )
    return _login(reply.head.get("LOGIN"))


def _login(value: str, session: str = "") -> tuple[str, str]:
    """`NAME BOOT_ID ADDR` as (`NAME BOOT_ID`, ADDR), each checked: ADDR becomes an ssh
    HostName when a session is pinned to its node (untrusted)."""
    words = value.split()
    if not words:
        return "", ""
    if len(words) > 3:
        raise untrusted.refused(session, "login node", value)
    login = untrusted.login(" ".join(words[:2]), session)
    return login, untrusted.address(words[2], session) if len(words) > 2 else ""


def pinned(cfg: ssh.SshConfig, host: str, addr: str) -> ssh.SshConfig:
    """CFG for one login node of HOST: to ADDR, with HOST's host key (as the user's ssh
    configuration resolves it) still checked against known_hosts."""
    done = proc.run(ssh.resolve_argv(cfg, host), timeout=10, what="ssh -G")
    if done.returncode != 0:
        raise ssh.explain_failure(host, done.stderr)
    return replace(cfg, pin=(addr, ssh.host_key_alias(done.stdout)))


def elsewhere(exc: JlremoteError) -> bool:
    """Did a script find itself on another login node than the session's?"""
    return exc.remote_code == Rc.ELSEWHERE


def release(cfg: ssh.SshConfig, host: str) -> None:
    """Close jlremote's control connection to HOST, if there is one."""
    if ssh.control_path(cfg):
        proc.run(ssh.control_exit_argv(cfg, host), timeout=10, what="ssh -O exit")


# ---- a server on the host ---------------------------------------------------------------


@dataclass(frozen=True)
class LaunchReport:
    """A server as a script reports it (a launch, or a registry entry)."""

    pid: int
    started: str
    cmdline: str
    session_dir: str
    port: int
    base_url: str
    version: str
    sock: str = ""
    # Set for a registry entry (a server that was already running: an attach).
    session_id: str = ""
    name: str = ""
    kind: str = ""
    token: str = ""
    login: str = ""  # the login node it runs on (`NAME BOOT_ID`)
    login_addr: str = ""
    here: bool = True  # False: another login node's entry (only that node can tell more)


def report_of(record: protocol.Record, session: str = "") -> LaunchReport:
    """A launch's (or a registry entry's) record as a LaunchReport. Every value is checked
    (untrusted): a registry entry is what the remote's shared home says."""
    entry = record.get("ENTRY")
    data = record.info_json()
    session = session or untrusted.text(record.get("NAME"), 60)
    login, login_addr = _login(record.get("LOGIN"), session)
    if entry and data is None and login and scripts.is_session_id(entry):
        return LaunchReport(
            pid=0, started="", cmdline="", session_dir="", port=0, base_url="/", version="",
            session_id=entry, name=_name(record, session), kind=record.get("KIND"),
            login=login, login_addr=login_addr, here=False,
        )  # fmt: skip
    try:
        if entry and not scripts.is_session_id(entry):
            raise ValueError(f"bad session id {entry!r}")
        if data is None:
            raise ValueError("no runtime JSON")
        port = data["port"]
        token = str(data.get("token") or "")
        return LaunchReport(
            pid=untrusted.number(record.get("PID"), session),
            started=record.get("START"),
            cmdline=record.get("ARGS"),
            session_dir=record.get("DIR"),
            port=untrusted.port(port, session) if port != 0 else 0,
            base_url=untrusted.url_path(str(data.get("base_url") or "/"), session),
            version=untrusted.text(str(data.get("version", "")), 40),
            sock=untrusted.socket_path(str(data.get("sock") or ""), session),
            session_id=entry,
            name=_name(record, session),
            kind=record.get("KIND"),
            token=untrusted.token(token, session) if token else "",
            login=login,
            login_addr=login_addr,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise JlremoteError(
            "could not understand the remote's answer (is the login shell POSIX-like?)",
            ExitCode.SERVER,
        ) from exc


def _name(record: protocol.Record, session: str) -> str:
    name = record.get("NAME")
    try:
        return options.check_name(name) if name else ""
    except JlremoteError:
        raise untrusted.refused(session, "session name", name) from None


def entries_of(reply: protocol.Reply) -> list[LaunchReport]:
    """The registry entries of a reply; an id that is not a whole id is skipped (it would
    name files and sockets here)."""
    reports = []
    for entry in reply.entries:
        if not scripts.is_session_id(entry.get("ENTRY")):
            continue
        try:
            reports.append(report_of(entry))
        except JlremoteError as exc:
            if exc.reason is not Reason.REMOTE_VALUE:
                raise
            log.warning("%s", exc.message)  # that entry only: the others are still shown
    return reports


@dataclass(frozen=True)
class Launched:
    """The server `launch` started, or found already running under the same name (then
    `attached_token` is that server's token; without it, on another login node: `elsewhere`
    is its address there)."""

    server: RemoteServer
    attached_token: str | None = None
    elsewhere: str = ""


def launch(
    cfg: ssh.SshConfig, host: str, spec: scripts.LaunchSpec, token: str, via: str = ""
) -> Launched:
    """Start the server on `host` (or find the live one of that name); the token goes over
    stdin, never into an argv. VIA: through the tunnel's own master at that path."""
    reply = ask(
        cfg,
        host,
        scripts.launch(spec),
        timeout=spec.timeout + cfg.connect_timeout + 15,
        what=f"starting the server on {host}",
        default=ExitCode.SERVER,
        stdin_text=token + "\n",
        via=via,
    )
    if reply.entries:
        report = report_of(reply.entries[0], spec.name)
        if not report.here:
            log.info("session %s runs on the login node %s", spec.name, report.login)
            return Launched(server_of(report), elsewhere=report.login_addr)
        log.info("attaching to the running session %s on %s", spec.name, host)
        return Launched(server_of(report), attached_token=report.token)
    report = report_of(reply.head, spec.name)
    report = replace(report, session_id=spec.session_id, kind=spec.subcommand)
    private = reply.head.get("PRIVATE")
    if private == "own":
        log.warning(
            "%s: the private JupyterLab's kernel is its own Python; for your environment's "
            "packages, give --env that activates one with ipykernel (pip install ipykernel)",
            host,
        )
    elif private == "env":
        log.info("%s: the private JupyterLab, with your --env Python as its kernel", host)
    if spec.transport == "tcp" and report.port == 0:
        # jupyter_server < 2.20 advertises port 0 when asked for a random one.
        stop(
            cfg,
            host,
            scripts.ServerIdentity(spec.session_id, report.pid, report.started, report.cmdline),
            grace=5,
        )
        raise JlremoteError(
            "the remote jupyter_server is too old to report its port; pass --port N "
            "(e.g. --port 8888) or upgrade jupyter_server",
            ExitCode.SERVER,
        )
    return Launched(server_of(report))


def server_of(report: LaunchReport) -> RemoteServer:
    """A reported server as a RemoteServer."""
    return RemoteServer(
        session_id=report.session_id,
        pid=report.pid,
        started=report.started,
        cmdline=report.cmdline,
        port=report.port,
        base_url=report.base_url,
        session_dir=report.session_dir,
        notebook=report.kind == "notebook",
        version=report.version,
        sock=report.sock,
        login=report.login,
        login_addr=report.login_addr,
    )


def list_sessions(cfg: ssh.SshConfig, host: str, timeout: float) -> list[LaunchReport]:
    """Every live jlremote server of this user on HOST, from any client (dead entries are
    removed on the way)."""
    reply = ask(cfg, host, scripts.listing(), timeout, f"listing {host}", ExitCode.CONNECT)
    return entries_of(reply)


def identity(server: RemoteServer) -> scripts.ServerIdentity:
    """What proves a remote process is this server."""
    tcp = not server.sock and not server.job_id
    return scripts.ServerIdentity(
        server.session_id,
        server.pid,
        server.started,
        server.cmdline,
        server.job_id,
        port=server.port if tcp else 0,
        login="" if server.job_id else server.login,
    )


@dataclass(frozen=True)
class Probed:
    """What one probe found: each server's state by session id (`running`, `queued`,
    `gone`, `foreign`, `elsewhere`; no entry: Slurm could not tell), what Slurm says about
    the jobs of job servers, and why servers that ended by themselves did."""

    states: dict[str, str]
    jobs: dict[str, slurm.JobState]
    ended: dict[str, str]


def probe_jobs(
    cfg: ssh.SshConfig, host: str, servers: list[RemoteServer], timeout: float, via: str = ""
) -> Probed:
    """One ssh call about SERVERS (see Probed)."""
    script = scripts.probe([identity(s) for s in servers])
    reply = ask(cfg, host, script, timeout, f"checking {host}", ExitCode.CONNECT, via=via)
    return Probed(
        states=dict(_pair(line) for line in reply.head.all("PROBE")),
        jobs={sid: slurm.parse_job_state(js) for sid, js in map(_pair, reply.head.all("JOB"))},
        ended=dict(_pair(line) for line in reply.head.all("ENDED")),
    )


def _pair(line: str) -> tuple[str, str]:
    first, _, rest = line.partition(" ")
    return first, rest.strip()


def probe(
    cfg: ssh.SshConfig, host: str, servers: list[RemoteServer], timeout: float
) -> dict[str, str]:
    """probe_jobs() without the jobs."""
    return probe_jobs(cfg, host, servers, timeout).states


def needs_proof(server: RemoteServer) -> bool:
    """Whether a forward to SERVER could reach somebody else once it has died: a TCP port
    (on the remote's loopback, or a job's node), not a Unix socket in a private directory."""
    return not server.sock


def prove_serving(cfg: ssh.SshConfig, host: str, server: RemoteServer, path: str) -> None:
    """Before a forward to SERVER's TCP port is (re)opened through the master at PATH:
    the recorded process must still be alive and hold that port (for a job: the job,
    whose own process the server is, must still run with our comment). Otherwise another
    user may be listening there: raise (ExitCode.SERVER), so nothing is forwarded to it."""
    try:
        states = probe_jobs(cfg, host, [server], cfg.connect_timeout + 15, via=path).states
    except JlremoteError as exc:
        if not exc.remote_code:  # ssh's own failure: as it is
            raise
        raise JlremoteError(f"could not check the server on {host}", ExitCode.CONNECT) from exc
    state = states.get(server.session_id)
    if state is None:
        raise JlremoteError(f"could not check the server on {host}", ExitCode.CONNECT)
    if state == "elsewhere":
        raise JlremoteError(
            f"the tunnel reached another login node of {host} than the server's "
            f"({server.login_name})",
            ExitCode.TUNNEL,
            remote_code=Rc.ELSEWHERE,
        )
    if state != "running":
        raise JlremoteError(
            f"the server on {host} is gone (its port is no longer its own)", ExitCode.SERVER
        )


def proof_of(
    cfg: ssh.SshConfig, host: str, server: RemoteServer
) -> Callable[[Tunnel], None] | None:
    """What a (re-)opened tunnel must check before it forwards to SERVER (None: nothing)."""
    if not needs_proof(server):
        return None
    return lambda master: prove_serving(cfg, host, server, master.control_path)


def on_its_login(cfg: ssh.SshConfig, host: str, server: RemoteServer) -> Callable[[Tunnel], None]:
    """The check for a re-opened tunnel to SERVER (before it forwards): the TCP proof
    (which includes the login node), or for a Unix socket, that the connection reached the
    server's login node (a socket forward to another node would only fail on use)."""
    proof = proof_of(cfg, host, server)
    if proof is not None:
        return proof

    def same_node(master: Tunnel) -> None:
        there, _ = hello(cfg, host, cfg.connect_timeout + 15, via=master.control_path)
        if there != server.login:
            raise JlremoteError(
                f"the tunnel reached another login node of {host} than the server's "
                f"({server.login_name})",
                ExitCode.TUNNEL,
                remote_code=Rc.ELSEWHERE,
            )

    return same_node


def stop(cfg: ssh.SshConfig, host: str, server: scripts.ServerIdentity, grace: float = 10.0) -> str:
    """Stop exactly this server and remove its session directory; returns what happened:
    `stopped`, `killed` (needed SIGKILL), `gone` (already) or `foreign` (PID reused)."""
    timeout = grace + cfg.connect_timeout + 15
    try:
        reply = ask(
            cfg, host, scripts.stop(server, grace), timeout, f"stopping on {host}", ExitCode.ERROR
        )
    except JlremoteError as exc:
        if elsewhere(exc) and cfg.pin is not None:
            return "gone"  # the login node at that address has restarted: so has the server
        raise
    state = reply.head.get("STOP")
    if not state:
        raise JlremoteError(f"stopping on {host} failed (no answer)", ExitCode.ERROR)
    return state


def read_log(cfg: ssh.SshConfig, host: str, server: RemoteServer, lines: int) -> list[str]:
    """The last LINES lines of a session's server log."""
    done = run_script(
        cfg,
        host,
        scripts.logs(server.session_id, lines, follow=False, login=identity(server).login),
        timeout=cfg.connect_timeout + 30,
        what=f"reading the log on {host}",
    )
    if done.returncode != 0:
        fallback = f"reading the log failed ({done.returncode})"
        raise failure(done.returncode, done.stderr, fallback, ExitCode.ERROR)
    return done.stdout.splitlines()


# ---- a server in a Slurm batch job -----------------------------------------------------


def submit(
    cfg: ssh.SshConfig, host: str, spec: scripts.LaunchSpec, sbatch: tuple[str, ...], token: str
) -> tuple[str, str]:
    """Submit the session's job on the login host HOST; returns the job id and the session
    directory. The token goes over stdin into a 0600 file in the session directory."""
    done = run_script(
        cfg,
        host,
        scripts.submit(spec, sbatch),
        timeout=cfg.connect_timeout + 60,
        what=f"submitting the job on {host}",
        stdin_text=token + "\n",
    )
    rc = done.returncode
    if rc == Rc.SBATCH_FAILED:
        lines = [ln.strip() for ln in done.stderr.strip().splitlines() if ln.strip()]
        said = [
            ln.removeprefix("sbatch: error: ") for ln in lines if not ln.startswith("jlremote: ")
        ]
        why = said[-1] if said else "no reason given"
        raise JlremoteError(
            f"sbatch refused the job: {why}", ExitCode.REMOTE_ENV, detail="\n".join(said[:-1])
        )
    if rc != 0:
        raise failure(
            rc, done.stderr, f"submitting the job failed (exit {rc})", ExitCode.REMOTE_ENV
        )
    reply = protocol.parse(done.stdout)
    job_id = reply.head.get("JOB").strip()
    if scripts.is_job_id(job_id):
        return job_id, reply.head.get("DIR").strip()
    raise JlremoteError(
        f"sbatch on {host} did not report a job id", ExitCode.SERVER, detail=done.stdout
    )


@dataclass(frozen=True)
class JobPoll:
    """One look at the job: its state (None when Slurm was not asked, or could not tell),
    its node once it runs there, the job script's own exit code if it failed, the server's
    runtime facts once it is up, and (once the job has ended) its log's last lines."""

    job: slurm.JobState | None
    node: str = ""
    address: str = ""
    failed: int = 0
    info: dict[str, object] | None = None
    log_tail: str = ""


def _job_poll(reply: protocol.Reply, stderr: str) -> JobPoll:
    head = reply.head
    job = slurm.parse_job_state(head.get("JOBSTATE")) if head.has("JOBSTATE") else None
    node, _, address = head.get("NODE").partition(" ")
    failed = head.get("FAILED").strip()
    address = address.strip()
    return JobPoll(
        job,
        node=untrusted.host_name(node) if node else "",
        address=untrusted.remote_host(address) if address else "",
        failed=int(failed) if failed.isdigit() else 0,
        info=head.info_json(),
        log_tail=stderr.strip(),
    )


def poll_job(
    cfg: ssh.SshConfig, host: str, session_id: str, job_id: str, ask_slurm: bool = True
) -> JobPoll:
    """The job's state (with ASK_SLURM), and its server's runtime facts once it is up."""
    script = scripts.poll(session_id, job_id, ask_slurm)
    done = run_script(
        cfg, host, script, cfg.connect_timeout + 15, f"asking {host} about job {job_id}"
    )
    return _job_poll(protocol.parse(done.stdout), done.stderr)


def set_route(cfg: ssh.SshConfig, host: str, session_id: str, route: str) -> None:
    """Tell the session's job how its node is reached (`sock` or `tcp`)."""
    script = scripts.route(session_id, route)
    ask(cfg, host, script, cfg.connect_timeout + 15, "telling the job its route", ExitCode.SERVER)


def cancel_job(cfg: ssh.SshConfig, host: str, session_id: str, job_id: str) -> JobPoll:
    """scancel the job (if still ours) and remove its session directory; returns its last
    state and the tail of its log."""
    script = scripts.cancel(session_id, job_id)
    done = run_script(cfg, host, script, cfg.connect_timeout + 15, f"cancelling job {job_id}")
    return _job_poll(protocol.parse(done.stdout), done.stderr)


def job_failure(job_id: str, poll: JobPoll) -> JlremoteError:
    """The error for a job that ended before its server was up: by the job script's own
    exit code when it failed itself, else by what Slurm says."""
    state = poll.job or slurm.JobState()
    ended = state.state.lower() if state.state else "ended"
    fallback = f"job {job_id} {ended} before the server started"
    if poll.failed:
        return failure(poll.failed, poll.log_tail, fallback, ExitCode.SERVER, f"job {job_id}: ")
    msg, detail = remote_message(poll.log_tail, fallback)
    if msg == fallback:
        return JlremoteError(msg, ExitCode.SERVER, detail=detail)
    return JlremoteError(f"{fallback}: {msg}", ExitCode.SERVER, detail=detail)
