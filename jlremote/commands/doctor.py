"""`jlremote doctor HOST`: check everything `start` needs, say what to do about each failure."""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from jlremote import proc, protocol, scripts, slurm, ssh, tunnel, untrusted
from jlremote.errors import ExitCode, JlremoteError
from jlremote.paths import ensure_private_dir, state_dir
from jlremote.remote import entries_of, release, run_script
from jlremote.results import Check, DoctorResult

log = logging.getLogger(__name__)

LOW_SPACE_KB = 1024 * 1024  # below 1 GB free in the remote home: a warning

# Records a check; a failed required check's exit code becomes doctor's (the first one).
_Add = Callable[..., None]


@dataclass(frozen=True)
class DoctorOptions:
    host: str
    env: str | None = None
    jupyter: str = "jupyter"
    timeout: float = 10.0
    slurm: bool = False  # also check what `start --slurm` needs on the login host
    sbatch: str = ""


@dataclass(frozen=True)
class DoctorReport:
    """What doctor.sh reported."""

    shell: str = ""
    os: str = ""
    free_kb: int | None = None
    env_failed: bool = False
    jupyter: str = ""
    private: bool = False  # the private JupyterLab of `jlremote install`
    versions: dict[str, str] | None = None
    sessions: tuple[str, ...] = ()
    slurm_missing: tuple[str, ...] = ()  # of sbatch, squeue, scancel
    partitions: dict[str, str] | None = None  # name ("*" marks the default) -> up/down/...
    home: str = ""


def read_doctor(reply: protocol.Reply) -> DoctorReport:
    head = reply.head
    versions = dict(_words2(v) for v in head.all("V"))
    partitions = dict(_words2(v) for v in head.all("SLURM-PART"))
    missing = [c for c, path in map(_words2, head.all("SLURM-BIN")) if not path]
    free = head.get("DF").strip()
    return DoctorReport(
        shell=head.get("SHELL").strip(),
        home=head.get("HOME").strip(),
        os=head.get("OS").strip(),
        free_kb=int(free) if free.isdigit() else None,
        env_failed=head.has("ENV-FAILED"),
        jupyter=head.get("JUPYTER").strip(),
        private=head.get("PRIVATE") == "1",
        versions=versions,
        sessions=tuple(entry.name for entry in entries_of(reply)),
        slurm_missing=tuple(missing),
        partitions=partitions,
    )


def _words2(value: str) -> tuple[str, str]:
    first, _, rest = value.partition(" ")
    return first, rest.strip()


def _connect_fix(host: str, failure: JlremoteError) -> str:
    if failure.code == ExitCode.AUTH and "host key" in failure.message:
        return (
            f"check the host's key with its admin, then `ssh-keygen -R {host}` and "
            f"`ssh {host} true` to accept the right one"
        )
    if failure.code == ExitCode.AUTH:
        return (
            f"set up a key (`ssh-copy-id {host}`, or `ssh-add` for your agent) until "
            f"`ssh {host} true` needs no password: the tunnel's keeper cannot type one"
        )
    return (
        f"check the name, address and port in ~/.ssh/config and that sshd runs there "
        f"(`ssh -v {host} true` shows where it stops)"
    )


def doctor(opts: DoctorOptions) -> DoctorResult:
    host = ssh.check_host(opts.host)
    checks: list[Check] = []
    failed: list[ExitCode] = []

    def add(check: Check, code: ExitCode = ExitCode.ERROR) -> None:
        checks.append(check)
        if check.status == "fail" and check.required:
            failed.append(code)

    def result() -> DoctorResult:
        return DoctorResult(host, checks, int(failed[0]) if failed else 0)

    # 1. The local ssh.
    try:
        cfg = ssh.SshConfig.from_environment(connect_timeout=int(max(1.0, opts.timeout)))
    except JlremoteError as exc:
        add(Check("ssh", "fail", exc.message, "install OpenSSH's client"), exc.code)
        return result()
    version = proc.run(ssh.version_argv(cfg), timeout=10, what="ssh -V")
    said = (version.stderr or version.stdout).strip().splitlines()
    add(Check("ssh", "ok", f"{said[0] if said else 'unknown version'} ({cfg.binary})"))

    # 2. What ssh makes of HOST (no network: `ssh -G`).
    if not _resolve_check(cfg, host, add):
        return result()

    # 3. A fresh, non-interactive connection.
    t0 = time.monotonic()
    connected = proc.run(
        ssh.probe_connect_argv(cfg, host), timeout=cfg.connect_timeout + 15, what="connecting"
    )
    took = round(time.monotonic() - t0, 3)
    if connected.returncode != 0:
        why = ssh.explain_failure(host, connected.stderr)
        add(Check("connect", "fail", why.message, _connect_fix(host, why), seconds=took), why.code)
        return result()
    add(Check("connect", "ok", f"authenticated without a prompt in {took:.2f}s", seconds=took))

    try:
        report = _remote_checks(cfg, host, opts, add)
        _privacy_check(report, _forward_checks(cfg, host, opts, add), opts, add)
        if opts.slurm:
            _node_route_check(cfg, host, add)
    finally:
        with contextlib.suppress(JlremoteError):
            release(cfg, host)
    return result()


def _resolve_check(cfg: ssh.SshConfig, host: str, add: _Add) -> bool:
    """What ssh makes of HOST (`ssh -G`, no network): whether it could say."""
    resolved = proc.run(ssh.resolve_argv(cfg, host), timeout=10, what="ssh -G")
    if resolved.returncode != 0:
        last = resolved.stderr.strip().splitlines()
        add(
            Check(
                "resolve",
                "fail",
                last[-1] if last else f"ssh -G {host} failed",
                "fix the error in your ssh configuration",
            ),
            ExitCode.CONNECT,
        )
        return False
    conf: dict[str, str] = {}
    for line in resolved.stdout.splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key, value)
    where = f"{conf.get('user', '?')}@{conf.get('hostname', host)} port {conf.get('port', '22')}"
    jump = conf.get("proxyjump", "none")
    if jump and jump != "none":
        where += f" via {jump}"
    add(Check("resolve", "ok", where))
    return True


def _remote_checks(cfg: ssh.SshConfig, host: str, opts: DoctorOptions, add: _Add) -> DoctorReport:
    done = run_script(
        cfg,
        host,
        scripts.doctor(opts.env, opts.jupyter, opts.slurm),
        timeout=cfg.connect_timeout + 30,
        what=f"checking {host}",
    )
    report = read_doctor(protocol.parse(done.stdout))
    if opts.slurm:
        _slurm_check(report, opts, add)
    _shell_check(report, add)
    _jupyter_check(report, host, opts, add)
    _disk_check(report, add)
    running = ", ".join(report.sessions)
    add(
        Check(
            "sessions",
            "ok",
            f"{len(report.sessions)} running: {running}" if report.sessions else "none running",
            required=False,
        )
    )
    return report


def _shell_check(report: DoctorReport, add: _Add) -> None:
    shell = report.shell.rsplit("/", 1)[-1]
    if shell not in ("csh", "tcsh", "fish"):
        add(Check("shell", "ok", f"{report.shell} on {report.os or 'unknown OS'}"))
        return
    add(
        Check(
            "shell",
            "warn",
            f"{report.shell} on {report.os}: not a POSIX shell; jlremote is tested with "
            "bash, dash and sh",
            "if start fails, set a POSIX login shell (chsh -s /bin/bash)",
            required=False,
        )
    )


def _jupyter_check(report: DoctorReport, host: str, opts: DoctorOptions, add: _Add) -> None:
    hint = (
        f"give the environment with --env (e.g. --env 'source ~/venv/bin/activate' or "
        f"'module load python'), or --jupyter /path/to/jupyter; or put `env = ...` in "
        f"config.toml under [hosts.{host}]"
    )
    if report.env_failed:
        add(
            Check("jupyter", "fail", f"the env snippet failed on the remote: {opts.env}", hint),
            ExitCode.REMOTE_ENV,
        )
        return
    if not report.jupyter:
        add(
            Check(
                "jupyter",
                "fail",
                f"'{opts.jupyter}' not found on the remote",
                hint + f"; or `jlremote install {host}` (a private JupyterLab; no internet "
                "needed there)",
            ),
            ExitCode.REMOTE_ENV,
        )
        return
    versions = report.versions or {}
    shown = ", ".join(
        f"{p} {versions[p]}" for p in ("jupyter_server", "jupyterlab", "notebook") if p in versions
    )
    if "jupyterlab" not in versions and "notebook" not in versions:
        add(
            Check(
                "jupyter",
                "fail",
                f"{report.jupyter}: neither jupyterlab nor notebook is installed"
                + (f" ({shown})" if shown else ""),
                "pip install jupyterlab in that environment",
            ),
            ExitCode.REMOTE_ENV,
        )
        return
    private = " (private JupyterLab, `jlremote install`)" if report.private else ""
    add(Check("jupyter", "ok", f"{report.jupyter}{private}: {shown}"))


def _disk_check(report: DoctorReport, add: _Add) -> None:
    if report.free_kb is None:
        add(Check("disk", "skip", "could not read free space in the remote home", required=False))
    elif report.free_kb < LOW_SPACE_KB:
        add(
            Check(
                "disk",
                "warn",
                f"only {report.free_kb / 1024:.0f} MB free in the remote home",
                "free some space: Jupyter writes its runtime files and logs there",
                required=False,
            )
        )
    else:
        add(Check("disk", "ok", f"{report.free_kb / 1024 / 1024:.1f} GB free in the remote home"))


def _privacy_check(
    report: DoctorReport, sock_ok: bool | None, opts: DoctorOptions, add: _Add
) -> None:
    """What other users of the host (and of the cluster) can reach of a session there."""
    common = "kernels talk over Unix sockets in a 0700 directory, the token is in a 0600 file"
    if len(report.home) + 36 > scripts.MAX_RUNTIME_DIR:
        common += " (the home is too deep for socket paths: a 0700 directory in /tmp)"
    if sock_ok:
        add(
            Check(
                "privacy",
                "ok",
                f"no other user can connect: the server is on a 0600 Unix socket, {common}",
                required=False,
            )
        )
    else:
        add(
            Check(
                "privacy",
                "warn",
                "other users of the host can connect to the server on its 127.0.0.1 (the "
                f"token keeps them out; its port is proven to be the server's own); {common}",
                "for a private socket: `AllowStreamLocalForwarding yes` in sshd_config",
                required=False,
            )
        )


def _node_route_check(cfg: ssh.SshConfig, host: str, add: _Add) -> None:
    """Whether a job's server gets a private socket: it does when our ssh reaches its node
    through HOST. Tested against the node of a job session of ours on HOST, if any (most
    clusters let a user onto a node only while a job of theirs runs there)."""
    from jlremote.state import StateStore

    nodes = sorted(
        {s.server.node for s in StateStore(state_dir()).read().values() if s.host == host} - {""}
    )
    cluster = (
        "every user of the cluster can connect to it (the token keeps them out; plain HTTP "
        "between the login host and the node)"
    )
    if not nodes:
        add(
            Check(
                "privacy-slurm",
                "warn",
                "decided per job: a private Unix socket on the node when `ssh -J "
                f"{host} NODE` works without a prompt, else the node's cluster address, where "
                + cluster,
                f"with a job running, `jlremote doctor {host} --slurm` tests its node",
                required=False,
            )
        )
        return
    node = nodes[0]
    done = proc.run(
        ssh.probe_connect_argv(cfg, host, node), timeout=cfg.connect_timeout + 15, what="ssh"
    )
    if done.returncode == 0:
        add(
            Check(
                "privacy-slurm",
                "ok",
                f"ssh reaches {node} through {host}: a job's server there is on a private "
                "Unix socket",
                required=False,
            )
        )
    else:
        why = ssh.explain_failure(node, done.stderr).message
        add(
            Check(
                "privacy-slurm",
                "warn",
                f"no ssh to {node} through {host} ({why}): a job's server listens on the "
                "node's cluster address, where " + cluster,
                f"for a private socket: make `ssh -J {host} {node} true` work without a "
                "prompt (the node's host key in known_hosts, a key it accepts)",
                required=False,
            )
        )


def _slurm_check(report: DoctorReport, opts: DoctorOptions, add: _Add) -> None:
    """sbatch, squeue and scancel on the login host's PATH, and the asked-for partition."""
    if report.slurm_missing:
        add(
            Check(
                "slurm",
                "fail",
                f"not found on the login host: {', '.join(report.slurm_missing)}",
                "run doctor against the cluster's login host, or have Slurm's commands on "
                "the PATH of non-interactive ssh commands (--env runs only inside the job)",
            ),
            ExitCode.REMOTE_ENV,
        )
        return
    parts = report.partitions or {}
    shown = ", ".join(f"{name} ({avail})" for name, avail in parts.items()) or "none listed"
    wanted = slurm.partition_of(slurm.parse_sbatch_options(opts.sbatch))
    known = {name.rstrip("*"): avail for name, avail in parts.items()}
    if wanted is not None and parts and wanted not in known:
        add(
            Check(
                "slurm",
                "fail",
                f"no partition {wanted!r}; partitions: {shown}",
                "fix -p/--partition in --sbatch (or in the profile's sbatch)",
            ),
            ExitCode.REMOTE_ENV,
        )
    elif wanted is not None and known.get(wanted, "up") != "up":
        add(
            Check(
                "slurm",
                "warn",
                f"partition {wanted!r} is {known[wanted]}: jobs will wait; partitions: {shown}",
                "pick another partition, or ask the admins when it is back",
                required=False,
            )
        )
    else:
        add(Check("slurm", "ok", f"sbatch, squeue and scancel found; partitions: {shown}"))


def _greeted(port: int) -> bool:
    """Does a connection to 127.0.0.1:PORT (our forward) reach the remote greeter?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            data = b""
            while len(data) < len(scripts.GREETING):
                chunk = s.recv(64)
                if not chunk:
                    break
                data += chunk
            return data == scripts.GREETING
    except OSError:
        return False


def _forward_checks(cfg: ssh.SshConfig, host: str, opts: DoctorOptions, add: _Add) -> bool | None:
    """The TCP and Unix-socket forwarding tests; whether the private transport works
    (None: could not be tested)."""
    probe_id = secrets.token_hex(8)
    done = run_script(
        cfg,
        host,
        scripts.forward_probe(probe_id, opts.env),
        timeout=cfg.connect_timeout + 30,
        what="starting the forwarding test",
    )
    words = protocol.parse(done.stdout).head.get("FWD").split()
    if len(words) < 2 or not words[0].isdigit():
        for name in ("tcp-forward", "socket-forward"):
            add(
                Check(
                    name,
                    "skip",
                    "no python3 on the remote to test it with",
                    required=False,
                )
            )
        return None
    # (what the remote says is checked before it becomes a -L target: untrusted)
    remote_port, remote_sock = untrusted.port(words[0]), untrusted.socket_path(words[1])
    tried = _try_forwards(cfg, host, probe_id, remote_port, remote_sock, add)
    if tried is None:
        return None
    tcp_ok, sock_ok = tried
    _said_forwards(tcp_ok, sock_ok, add)
    return sock_ok


def _try_forwards(
    cfg: ssh.SshConfig, host: str, probe_id: str, remote_port: int, remote_sock: str, add: _Add
) -> tuple[bool, bool] | None:
    """Forward a local port to the greeter's TCP port and one to its socket, through a
    connection of their own: whether each greeted (None: the connection failed, said)."""
    logfile = ensure_private_dir(state_dir() / "logs") / f"doctor-{probe_id}.log"
    master = None
    tcp_ok = sock_ok = False
    try:
        master = tunnel.start_master(cfg, host, probe_id, logfile)
        tcp_port = tunnel.pick_free_port()
        tunnel.forward(cfg, host, master, tcp_port, ssh.Target(port=remote_port))
        tcp_ok = _greeted(tcp_port)
        sock_port = tunnel.pick_free_port()
        with contextlib.suppress(JlremoteError):
            tunnel.forward(cfg, host, master, sock_port, ssh.Target(socket=remote_sock))
            sock_ok = _greeted(sock_port)
    except JlremoteError as exc:
        add(Check("tcp-forward", "fail", exc.message, "see `ssh -v`"), exc.code)
        return None
    finally:
        if master is not None:
            tunnel.close_tunnel(master)
        if not (tcp_ok and sock_ok):  # greeted twice, the listener has gone by itself
            with contextlib.suppress(JlremoteError):
                run_script(cfg, host, scripts.forward_cleanup(probe_id), timeout=20, what="cleanup")
        with contextlib.suppress(FileNotFoundError):
            logfile.unlink()
    return tcp_ok, sock_ok


def _said_forwards(tcp_ok: bool, sock_ok: bool, add: _Add) -> None:
    if tcp_ok:
        add(Check("tcp-forward", "ok", "the remote sshd forwards TCP to its 127.0.0.1"))
    else:
        add(
            Check(
                "tcp-forward",
                "fail",
                "the remote sshd refuses TCP forwarding",
                "ask its admin for `AllowTcpForwarding yes` (or local) in sshd_config",
                required=not sock_ok,
            ),
            ExitCode.TUNNEL,
        )
    if sock_ok:
        add(
            Check(
                "socket-forward",
                "ok",
                "the remote sshd forwards to Unix sockets (the private transport works)",
                required=False,
            )
        )
    else:
        add(
            Check(
                "socket-forward",
                "warn",
                "the remote sshd refuses Unix-socket forwarding; start falls back to TCP on "
                "the remote's 127.0.0.1",
                "for the private transport: `AllowStreamLocalForwarding yes` in sshd_config",
                required=not tcp_ok,
            ),
            ExitCode.TUNNEL,
        )
