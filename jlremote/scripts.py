"""The remote scripts as commands for ssh: pure builders.

The scripts themselves are shell files in `jlremote/sh/`, each run after the shared
`lib.sh`. Their text is fixed: every value of the user's or the state file's reaches
them as a positional argument (quoted once, by Script.command()), never pasted in. They
run under bash where the remote has it (so `source` in --env works), else sh. The Jupyter
token is never an argument: the scripts that need it read it from stdin. What they print
is read by protocol.py; their exit codes are the `Rc` below (remote.py maps them).
"""

from __future__ import annotations

import functools
import math
import re
import shlex
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from jlremote.slurm import with_warning_signal

SH_DIR = Path(__file__).resolve().parent / "sh"
_SESSION_ID = re.compile(r"[0-9a-f]{8,64}")
_JOB_ID = re.compile(r"[0-9]+")
# How many of a failed server's last log lines the scripts show (lib.sh's LOG_TAIL).
LOG_TAIL_LINES = 15
# lib.sh's MAX_RUNTIME_DIR: a longer session directory gets a short runtime directory.
MAX_RUNTIME_DIR = 56
# Kernels talk to the server over Unix sockets in the server's private runtime directory,
# never over TCP ports of the remote's loopback, where any user could subscribe to them.
KERNEL_OPTIONS = ("--KernelManager.transport=ipc",)
GREETING = b"jlremote-ok\n"  # what greeter.py says to each client


class Rc(IntEnum):
    """The remote scripts' own exit codes (lib.sh names the same values)."""

    SESSION_DIR = 80
    NO_TOKEN = 81
    ENV_FAILED = 82
    NO_DIR = 83
    SERVER_EXITED = 84
    SERVER_TIMEOUT = 85
    NO_ENTRY = 86
    NO_SBATCH = 87
    SBATCH_FAILED = 88
    NO_SUBCOMMAND = 89
    NEEDS_ROOT = 90
    NO_SOCKET = 91
    SLURM_SILENT = 92
    ELSEWHERE = 93
    NO_PYTHON = 94
    INSTALL_FAILED = 95
    IN_USE = 96
    NOT_FOUND = 127


@functools.cache
def source(name: str) -> str:
    """The text of a file in jlremote/sh/."""
    return (SH_DIR / name).read_text(encoding="utf-8")


# The command line given to ssh runs the script (its first argument) with bash if the
# remote has it, else sh, passing the rest on as $1, $2, ...: whatever the user's login
# shell, it is one plain command of quoted words.
RUNNER = (
    's=$1; shift; if command -v bash >/dev/null 2>&1; then exec bash -c "$s" jlremote "$@"; '
    'fi; exec sh -c "$s" jlremote "$@"'
)


@dataclass(frozen=True)
class Script:
    """One remote script (a file in jlremote/sh/, after lib.sh) and its arguments."""

    name: str
    args: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return source("lib.sh") + "\n" + source(f"{self.name}.sh")

    def command(self) -> str:
        """The remote command line: the script's text and every argument, each quoted."""
        words = ["sh", "-c", RUNNER, "jlremote", self.text, *self.args]
        return " ".join(shlex.quote(w) for w in words)


def is_session_id(text: str) -> bool:
    """Whether TEXT (read back from the remote, say) is a whole session id and no more."""
    return _SESSION_ID.fullmatch(text) is not None


def is_job_id(text: str) -> bool:
    """Whether TEXT is a whole Slurm job id (ASCII digits, no newline, no sign)."""
    return _JOB_ID.fullmatch(text) is not None


def check_session_id(session_id: str) -> str:
    if not is_session_id(session_id):
        raise ValueError(f"bad session id {session_id!r}")
    return session_id


def check_job_id(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError(f"bad job id {job_id!r}")
    return job_id


def job_comment(session_id: str) -> str:
    """The job's comment: with the job id it proves a job is this session's."""
    return f"jlremote:{session_id}"


# ---- a server on the host -------------------------------------------------------------


@dataclass(frozen=True)
class LaunchSpec:
    """What to start on the remote."""

    session_id: str
    notebook: bool = False
    port: int | None = None
    directory: str | None = None
    env: str | None = None
    jupyter: str = "jupyter"
    allow_root: bool = False
    timeout: float = 60.0
    # "socket": serve on a 0600 Unix socket in the session directory; "tcp": 127.0.0.1.
    transport: str = "tcp"
    # The session's name, kept in the session directory: another client attaches by it.
    name: str = ""
    # Only attach to a running server of this name; never start one.
    attach_only: bool = False
    # --idle-timeout in seconds (0: none), and as the user said it (`2h`).
    idle_seconds: int = 0
    idle_label: str = ""
    # A job queued with --no-wait waits for its client as long as it lasts (or, with
    # --idle-timeout, that long); otherwise for ROUTE_WAIT seconds.
    no_wait: bool = False

    @property
    def subcommand(self) -> str:
        return "notebook" if self.notebook else "lab"


# How long a job waits for its client to say how the node is reached, when the client
# waits for the job (start --slurm without --no-wait).
ROUTE_WAIT = 120


def _idle(spec: LaunchSpec) -> tuple[str, str]:
    """The `SECONDS LABEL` of --idle-timeout and the watcher's text ("", "" without)."""
    if not spec.idle_seconds:
        return "", ""
    return f"{spec.idle_seconds:d} {spec.idle_label}", source("idle.py")


def server_argv(spec: LaunchSpec) -> list[str]:
    """The server's own argv, as both a launch and a job run it (no token: that is in a
    file; no address: the launch and job scripts add it)."""
    argv = [spec.jupyter, spec.subcommand, "--no-browser", *KERNEL_OPTIONS]
    if spec.allow_root:
        argv.append("--allow-root")
    return argv


def jupyter_argv(spec: LaunchSpec) -> list[str]:
    """The server's argv on the host. In socket mode launch.sh adds `--sock=...`."""
    argv = [spec.jupyter, spec.subcommand, "--no-browser", *KERNEL_OPTIONS]
    if spec.transport == "tcp":
        # --port=0: the kernel picks a free port; the server reports it in jpserver-<pid>.json.
        argv += ["--ip=127.0.0.1", f"--port={spec.port if spec.port is not None else 0}"]
    if spec.allow_root:
        argv.append("--allow-root")
    return argv


def launch(spec: LaunchSpec) -> Script:
    """Start a server as SPEC asks (or report the live one of its name); token on stdin."""
    return Script(
        "launch",
        (
            check_session_id(spec.session_id),
            spec.name,
            spec.subcommand,
            "1" if spec.attach_only else "0",
            # Whole seconds from `date +%s`: never earlier than asked, at most a second later.
            str(math.ceil(spec.timeout) + 1),
            f"{spec.timeout:g}",
            spec.transport,
            spec.env or "",
            spec.directory or "",
            *_idle(spec),
            *jupyter_argv(spec),
        ),
    )


def listing() -> Script:
    """Every live jlremote server of this user (ENTRY blocks); dead entries go."""
    return Script("list")


@dataclass(frozen=True)
class ServerIdentity:
    """How a remote server process is recognised: all three must match. A server in a
    Slurm job is recognised by its job id and the job's comment instead."""

    session_id: str
    pid: int
    started: str
    cmdline: str
    job_id: str = ""
    # A TCP server's port: the server must also hold its listening socket (0: a Unix
    # socket in a private directory, or a job, which nobody else can take over).
    port: int = 0
    # The login node it runs on (`NAME BOOT_ID`; "": any, or unknown).
    login: str = ""


def probe(servers: list[ServerIdentity]) -> Script:
    """`PROBE SESSION running|gone|foreign` for each server (and `JOB` lines for jobs)."""
    args: list[str] = []
    for s in servers:
        job = check_job_id(s.job_id) if s.job_id else ""
        args += [check_session_id(s.session_id), f"{s.pid:d}", s.started, s.cmdline]
        args += [f"{s.port:d}", job, s.login]
    return Script("probe", tuple(args))


def stop(server: ServerIdentity, grace: float = 10.0) -> Script:
    """Stop exactly our server (TERM, KILL after GRACE seconds) and remove its files."""
    job = check_job_id(server.job_id) if server.job_id else ""
    ticks = max(1, int(grace * 10))
    return Script(
        "stop",
        (
            check_session_id(server.session_id),
            f"{server.pid:d}",
            server.started,
            server.cmdline,
            job,
            str(ticks),
            server.login,
        ),
    )


def logs(session_id: str, lines: int, follow: bool, login: str = "") -> Script:
    """The server log's last LINES lines (and, with FOLLOW, new ones until the end), on
    the login node LOGIN."""
    return Script(
        "logs", (check_session_id(session_id), f"{lines:d}", "1" if follow else "0", login)
    )


def hello() -> Script:
    """Which login node the connection reached (`LOGIN NAME BOOT_ID ADDR`)."""
    return Script("hello")


def doctor(env: str | None, jupyter: str, slurm: bool = False) -> Script:
    """What `doctor` asks the remote, in one go."""
    return Script("doctor", (env or "", jupyter, "1" if slurm else "0"))


def forward_probe(probe_id: str, env: str | None) -> Script:
    """Start the greeter (greeter.py) that doctor's forwarding test reaches."""
    return Script("fwdprobe", (check_session_id(probe_id), env or "", source("greeter.py")))


def forward_cleanup(probe_id: str) -> Script:
    """Stop the greeter if it still waits, and remove its directory."""
    return Script("fwdclean", (check_session_id(probe_id),))


# ---- a server in a Slurm batch job ------------------------------------------------------


def job_text() -> str:
    """The batch script (job.sh after lib.sh): no secret, no value of the user's."""
    return "#!/bin/bash\n" + source("lib.sh") + "\n" + source("job.sh")


def submit(spec: LaunchSpec, sbatch: tuple[str, ...]) -> Script:
    """Make the session directory, store the token (stdin) and submit the job with the
    user's sbatch options (each its own word), and our --signal for a clean end before
    the time limit unless they set one."""
    argv = server_argv(spec)
    if any("\n" in word for word in argv):
        raise ValueError("a newline in the server's argv")
    return Script(
        "submit",
        (
            check_session_id(spec.session_id),
            spec.name,
            spec.subcommand,
            job_text(),
            spec.env or "",
            spec.directory or "",
            "\n".join(argv),
            "0" if spec.no_wait else str(ROUTE_WAIT),
            *_idle(spec),
            *with_warning_signal(sbatch),
        ),
    )


def poll(session_id: str, job_id: str, ask_slurm: bool = True) -> Script:
    """The job's state (with ASK_SLURM), its node, and the server once it is up."""
    return Script(
        "poll", (check_session_id(session_id), check_job_id(job_id), "1" if ask_slurm else "0")
    )


ROUTES = ("sock", "tcp")


def route(session_id: str, how: str) -> Script:
    """Tell the job how the client reaches its node (the job waits for this)."""
    if how not in ROUTES:
        raise ValueError(f"bad route {how!r}")
    return Script("route", (check_session_id(session_id), how))


def cancel(session_id: str, job_id: str) -> Script:
    """scancel the job if still ours; its last state, its log's tail; its files go."""
    return Script("cancel", (check_session_id(session_id), check_job_id(job_id)))
