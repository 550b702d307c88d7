"""Things done on the remote: each is one `ssh HOST -- <script>` built by scripts.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from jlremote import proc, scripts, slurm, ssh
from jlremote.errors import ExitCode, JlremoteError
from jlremote.state import RemoteServer, Tunnel

log = logging.getLogger(__name__)


def run_script(
    cfg: ssh.SshConfig,
    host: str,
    script: str,
    timeout: float,
    what: str,
    stdin_text: str | None = None,
    via: str = "",
) -> proc.Completed:
    """Run SCRIPT on HOST through jlremote's shared connection (or, with VIA, through the
    tunnel's own master at that path: no login of its own)."""
    command = scripts.wrap(script)
    if via:
        argv = ssh.via_master_argv(cfg, host, via, command)
    else:
        argv = ssh.command_argv(cfg, host, command)
    done = proc.run(argv, timeout=timeout, stdin_text=stdin_text, what=what)
    if done.returncode == 255:
        raise ssh.explain_failure(host, done.stderr)
    return done


def needs_proof(server: RemoteServer) -> bool:
    """Whether a forward to SERVER could reach somebody else once it has died: a TCP port
    (on the remote's loopback, or a job's node), not a Unix socket in a private directory."""
    return not server.sock


def prove_serving(cfg: ssh.SshConfig, host: str, server: RemoteServer, path: str) -> None:
    """Before a forward to SERVER's TCP port is (re)opened through the master at PATH:
    the recorded process must still be alive and hold that port (for a job: the job,
    whose own process the server is, must still run with our comment). Otherwise another
    user may be listening there: raise (ExitCode.SERVER), so nothing is forwarded to it."""
    script = scripts.probe_script([identity(server)])
    done = run_script(cfg, host, script, cfg.connect_timeout + 15, f"checking {host}", via=path)
    state = scripts.parse_probe_output(done.stdout).get(server.session_id)
    if done.returncode != 0 or state is None:
        raise JlremoteError(f"could not check the server on {host}", ExitCode.CONNECT)
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


def warm(cfg: ssh.SshConfig, host: str, timeout: float) -> None:
    """Open (or reuse) jlremote's control connection to HOST: the one place that may ask
    for a password or 2FA, before anything runs in parallel."""
    run_script(cfg, host, "true", timeout=timeout, what=f"connecting to {host}")


def release(cfg: ssh.SshConfig, host: str) -> None:
    """Close jlremote's control connection to HOST, if there is one."""
    if ssh.control_path(cfg):
        proc.run(ssh.control_exit_argv(cfg, host), timeout=10, what="ssh -O exit")


def remote_message(stderr: str, fallback: str) -> tuple[str, str]:
    """Our script's own `jlremote: ...` line (the message) and what followed it (detail)."""
    lines = stderr.strip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("jlremote: "):
            return line[len("jlremote: ") :], "\n".join(lines[i + 1 :])
    return fallback, "\n".join(lines[-scripts.LOG_TAIL_LINES :])


@dataclass(frozen=True)
class Launched:
    """The server `launch` started, or found already running under the same name (then
    `attached_token` is that server's token)."""

    server: RemoteServer
    attached_token: str | None = None


def launch(cfg: ssh.SshConfig, host: str, spec: scripts.LaunchSpec, token: str) -> Launched:
    """Start the server on `host` (or find the live one of that name); the token goes over
    stdin, never into an argv."""
    done = run_script(
        cfg,
        host,
        scripts.launch_script(spec),
        timeout=spec.timeout + cfg.connect_timeout + 15,
        what=f"starting the server on {host}",
        stdin_text=token + "\n",
    )
    rc = done.returncode
    if rc != 0:
        msg, detail = remote_message(done.stderr, f"the remote start-up failed (exit {rc})")
        if rc == scripts.RC_NOT_FOUND:
            raise JlremoteError(
                f"{msg} (put it on PATH with --env 'source ~/venv/bin/activate', or give "
                "--jupyter /path/to/jupyter)",
                ExitCode.REMOTE_ENV,
            )
        if rc == scripts.RC_NO_ENTRY:
            raise JlremoteError(msg, ExitCode.NO_SESSION)
        if rc in (scripts.RC_NO_DIR, scripts.RC_ENV_FAILED, scripts.RC_SESSION_DIR):
            raise JlremoteError(msg, ExitCode.REMOTE_ENV, detail=detail)
        if rc == scripts.RC_SERVER_EXITED and "not found" in detail and "Jupyter command" in detail:
            missing = "notebook" if spec.notebook else "jupyterlab"
            raise JlremoteError(
                f"'{spec.jupyter} {spec.subcommand}' is not installed on the remote "
                f"(pip install {missing} there, or point --env/--jupyter at an environment "
                "that has it)",
                ExitCode.REMOTE_ENV,
                detail=detail,
            )
        if rc in (scripts.RC_SERVER_EXITED, scripts.RC_SERVER_TIMEOUT):
            if "as root is not recommended" in detail or "--allow-root" in detail:
                msg += " (it refuses to run as root without --allow-root)"
            raise JlremoteError(msg, ExitCode.SERVER, detail=detail)
        raise JlremoteError(msg, ExitCode.SERVER, detail=detail)
    report = scripts.parse_launch_output(done.stdout)
    if report.session_id:
        log.info("attaching to the running session %s on %s", spec.name, host)
        return Launched(server_of(report), attached_token=report.token)
    if spec.transport == "tcp" and report.port == 0:
        # jupyter_server < 2.20 advertises port 0 when asked for a random one.
        stop(cfg, host, _identity(spec.session_id, report), grace=5)
        raise JlremoteError(
            "the remote jupyter_server is too old to report its port; pass --port N "
            "(e.g. --port 8888) or upgrade jupyter_server",
            ExitCode.SERVER,
        )
    # The report of a server we just started: the same shape as a registry entry.
    return Launched(server_of(replace(report, session_id=spec.session_id, kind=spec.subcommand)))


def server_of(report: scripts.LaunchReport) -> RemoteServer:
    """A registry entry as a RemoteServer."""
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
    )


def list_sessions(cfg: ssh.SshConfig, host: str, timeout: float) -> list[scripts.LaunchReport]:
    """Every live jlremote server of this user on HOST, from any client (dead entries are
    removed on the way)."""
    done = run_script(cfg, host, scripts.list_script(), timeout=timeout, what=f"listing {host}")
    if done.returncode != 0:
        msg, _ = remote_message(done.stderr, f"listing {host} failed (exit {done.returncode})")
        raise JlremoteError(msg, ExitCode.CONNECT)
    return scripts.parse_list_output(done.stdout)


def _identity(session_id: str, report: scripts.LaunchReport) -> scripts.ServerIdentity:
    return scripts.ServerIdentity(session_id, report.pid, report.started, report.cmdline)


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
    )


def probe(
    cfg: ssh.SshConfig, host: str, servers: list[RemoteServer], timeout: float
) -> dict[str, str]:
    """One ssh call: for each server's session id, `running`, `gone` or `foreign`."""
    return probe_jobs(cfg, host, servers, timeout)[0]


def stop(cfg: ssh.SshConfig, host: str, server: scripts.ServerIdentity, grace: float = 10.0) -> str:
    """Stop exactly this server and remove its session directory; returns what happened:
    `stopped`, `killed` (needed SIGKILL), `gone` (already) or `foreign` (PID reused)."""
    script = scripts.stop_script(server, grace=grace)
    done = run_script(
        cfg, host, script, timeout=grace + cfg.connect_timeout + 15, what=f"stopping on {host}"
    )
    state = scripts.parse_stop_output(done.stdout)
    if done.returncode != 0 or state is None:
        msg, _ = remote_message(done.stderr, f"stopping on {host} failed (exit {done.returncode})")
        raise JlremoteError(msg, ExitCode.ERROR)
    return state


# ---- a server in a Slurm batch job -----------------------------------------------------


def submit(cfg: ssh.SshConfig, host: str, job: slurm.JobSpec, token: str) -> tuple[str, str]:
    """Submit the session's job on the login host HOST; returns the job id and the session
    directory. The token goes over stdin into a 0600 file in the session directory."""
    done = run_script(
        cfg,
        host,
        slurm.submit_script(job),
        timeout=cfg.connect_timeout + 60,
        what=f"submitting the job on {host}",
        stdin_text=token + "\n",
    )
    rc = done.returncode
    if rc == slurm.RC_SBATCH_FAILED:
        lines = [ln.strip() for ln in done.stderr.strip().splitlines() if ln.strip()]
        said = [
            ln.removeprefix("sbatch: error: ") for ln in lines if not ln.startswith("jlremote: ")
        ]
        why = said[-1] if said else "no reason given"
        raise JlremoteError(
            f"sbatch refused the job: {why}", ExitCode.REMOTE_ENV, detail="\n".join(said[:-1])
        )
    if rc != 0:
        msg, detail = remote_message(done.stderr, f"submitting the job failed (exit {rc})")
        raise JlremoteError(msg, ExitCode.REMOTE_ENV, detail=detail)
    reported: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        reported[key] = value
    job_id = reported.get("JLREMOTE-JOB", "").strip()
    if scripts.is_job_id(job_id):
        return job_id, reported.get("JLREMOTE-DIR", "").strip()
    raise JlremoteError(
        f"sbatch on {host} did not report a job id", ExitCode.SERVER, detail=done.stdout
    )


@dataclass(frozen=True)
class JobPoll:
    """One look at the job: its state, the server once it is up, and (once the job has
    ended) the last lines of its log."""

    poll: slurm.JobPoll
    log_tail: str


def poll_job(
    cfg: ssh.SshConfig, host: str, session_id: str, job_id: str, ask_slurm: bool = True
) -> JobPoll:
    """The job's state (with ASK_SLURM), and its server's runtime facts once it is up."""
    script = slurm.poll_script(session_id, job_id, ask_slurm)
    return _job_script(cfg, host, script, f"asking {host} about job {job_id}")


def set_route(cfg: ssh.SshConfig, host: str, session_id: str, route: str) -> None:
    """Tell the session's job how its node is reached (`sock` or `tcp`)."""
    done = run_script(
        cfg, host, slurm.route_script(session_id, route), cfg.connect_timeout + 15, "routing"
    )
    if done.returncode != 0:
        msg, _ = remote_message(
            done.stderr, f"telling the job its route failed (exit {done.returncode})"
        )
        raise JlremoteError(msg, ExitCode.SERVER)


def cancel_job(cfg: ssh.SshConfig, host: str, session_id: str, job_id: str) -> JobPoll:
    """scancel the job (if still ours) and remove its session directory; returns its last
    state and the tail of its log."""
    script = slurm.cancel_script(session_id, job_id)
    return _job_script(cfg, host, script, f"cancelling job {job_id} on {host}")


def _job_script(cfg: ssh.SshConfig, host: str, script: str, what: str) -> JobPoll:
    done = run_script(cfg, host, script, timeout=cfg.connect_timeout + 15, what=what)
    return JobPoll(slurm.parse_poll_output(done.stdout), done.stderr.strip())


def probe_jobs(
    cfg: ssh.SshConfig, host: str, servers: list[RemoteServer], timeout: float
) -> tuple[dict[str, str], dict[str, slurm.JobState]]:
    """probe(), plus what Slurm says about the jobs of job servers."""
    script = scripts.probe_script([identity(s) for s in servers])
    done = run_script(cfg, host, script, timeout=timeout, what=f"checking {host}")
    if done.returncode != 0:
        msg, _ = remote_message(done.stderr, f"checking {host} failed (exit {done.returncode})")
        raise JlremoteError(msg, ExitCode.CONNECT)
    jobs = {
        sid: slurm.parse_job_state(line)
        for sid, line in scripts.parse_probe_jobs(done.stdout).items()
    }
    return scripts.parse_probe_output(done.stdout), jobs


def job_failure(job_id: str, state: slurm.JobState, log_tail: str) -> JlremoteError:
    """The error for a job that ended before its server was up, from its log's tail."""
    ended = state.state.lower() if state.state else "ended"
    msg, detail = remote_message(log_tail, f"job {job_id} {ended} before the server started")
    if msg.endswith("not found on the compute node"):
        return JlremoteError(
            f"job {job_id}: {msg} (put it on PATH with --env 'source ~/venv/bin/activate' or "
            "'module load ...', or give --jupyter /path/to/jupyter)",
            ExitCode.REMOTE_ENV,
            detail=detail,
        )
    if "--env" in msg or "directory not found" in msg:
        return JlremoteError(f"job {job_id}: {msg}", ExitCode.REMOTE_ENV, detail=detail)
    if msg.startswith("job "):
        return JlremoteError(msg, ExitCode.SERVER, detail=detail)
    return JlremoteError(
        f"job {job_id} {ended} before the server started: {msg}", ExitCode.SERVER, detail=detail
    )
