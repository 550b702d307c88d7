"""Pure builders of the shell scripts jlremote runs on the remote, and parsers of what
they print back.

Every value that comes from the user or the state file is inserted with shlex.quote; the
scripts are POSIX sh (run by bash when the remote has it, so `source` in --env works). The
Jupyter token is never part of a script: the launch script reads it from stdin.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass

from jlremote.errors import ExitCode, JlremoteError

q = shlex.quote

# Marker exit codes of our own remote scripts (127 is the shell's "command not found").
RC_SESSION_DIR = 80
RC_NO_TOKEN = 81
RC_ENV_FAILED = 82
RC_NO_DIR = 83
RC_SERVER_EXITED = 84
RC_SERVER_TIMEOUT = 85
RC_NO_ENTRY = 86
RC_NOT_FOUND = 127

SESSIONS_ROOT = '"$HOME"/.jlremote/sessions'
_SESSION_ID = re.compile(r"[0-9a-f]{8,64}")
_JOB_ID = re.compile(r"[0-9]+")
LOG_TAIL_LINES = 15


def session_dir_expr(session_id: str) -> str:
    """Shell expression of a session's private directory on the remote."""
    if not is_session_id(session_id):
        raise ValueError(f"bad session id {session_id!r}")
    return f"{SESSIONS_ROOT}/{session_id}"


def is_session_id(text: str) -> bool:
    """Whether TEXT (read back from the remote, say) is a whole session id and no more."""
    return _SESSION_ID.fullmatch(text) is not None


def is_job_id(text: str) -> bool:
    """Whether TEXT is a whole Slurm job id (ASCII digits, no newline, no sign)."""
    return _JOB_ID.fullmatch(text) is not None


def wrap(script: str) -> str:
    """The command line given to ssh: run `script` with bash if the remote has it, else sh.

    Whatever the user's login shell, this one line is a plain command with quoted words.
    """
    runner = 'if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; fi; exec sh -c "$1"'
    return f"sh -c {q(runner)} jlremote {q(script)}"


def remote_path_expr(path: str) -> str:
    """A user's remote path as a shell word: `~` and relative paths are under $HOME."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + q(path[2:])
    if path.startswith("/"):
        return q(path)
    return '"$HOME"/' + q(path)


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

    @property
    def subcommand(self) -> str:
        return "notebook" if self.notebook else "lab"


SOCKET_NAME = "jupyter.sock"
# Kernels talk to the server over Unix sockets in the server's private runtime directory,
# never over TCP ports of the remote's loopback, where any user could subscribe to them.
KERNEL_OPTIONS = ("--KernelManager.transport=ipc",)
# A kernel's sockets are RUNTIME/kernel-<uuid>-ipc-<n>: 51 bytes after the directory, and a
# Unix socket address holds 107. A session directory longer than this (a deep home) gets a
# short private runtime directory of its own instead (named in the session's `run` file).
MAX_RUNTIME_DIR = 56


def jupyter_argv(spec: LaunchSpec) -> list[str]:
    """The server's own argv (no token: that travels in the environment). In socket mode
    the launch script adds `--sock=<session dir>/jupyter.sock`."""
    argv = [spec.jupyter, spec.subcommand, "--no-browser", *KERNEL_OPTIONS]
    if spec.transport == "tcp":
        # --port=0: the kernel picks a free port; the server reports it in jpserver-<pid>.json.
        argv += ["--ip=127.0.0.1", f"--port={spec.port if spec.port is not None else 0}"]
    if spec.allow_root:
        argv.append("--allow-root")
    return argv


def _fail(code: int, message_expr: str, *, tail_log: bool = False) -> str:
    parts = [f"printf '%s\\n' {message_expr} >&2"]
    if tail_log:
        parts.append(f'tail -n {LOG_TAIL_LINES} "$d/server.log" >&2 2>/dev/null')
    parts += ['drop_entry "$d"', f"exit {code}"]
    return "{ " + "; ".join(parts) + "; }"


def launch_script(spec: LaunchSpec) -> str:
    """Start a detached Jupyter server in a private session directory and report on it.

    Prints (stdout) `JLREMOTE-WAIT` lines while waiting (a write to a vanished client
    raises SIGPIPE, and the trap then stops the half-started server), then `JLREMOTE-PID`,
    `JLREMOTE-START` (ps lstart), `JLREMOTE-ARGS` (ps args), `JLREMOTE-DIR`, and the
    server's runtime JSON between `JLREMOTE-INFO` and `JLREMOTE-END`.
    """
    d = session_dir_expr(spec.session_id)
    # Whole seconds from `date +%s`: never earlier than asked, at most a second later.
    wait_s = math.ceil(spec.timeout) + 1
    server = " ".join(q(a) for a in jupyter_argv(spec))
    if spec.transport == "socket":
        server += f' --sock="$rt"/{SOCKET_NAME}'
    lines = [
        "umask 077",
        _IDENTITY_CHECK.rstrip("\n"),
        _REGISTRY.rstrip("\n"),
        # A live server of this name (started by any client of this user) is reused.
        f"existing=$(scan {q(spec.name)})" if spec.name else "existing=",
        """if [ -n "$existing" ]; then printf '%s\\n' "$existing"; exit 0; fi""",
    ]
    if spec.attach_only:
        lines.append(
            f"echo {q(f'jlremote: no running session named {spec.name} on the remote')} >&2; "
            f"exit {RC_NO_ENTRY}"
        )
    lines += [
        f"d={d}",
        'rt="$d"',
        "child=",
        # Whatever goes wrong after launch, the half-started server and its files go too.
        'end_child() { [ -n "$child" ] || return 0; kill "$child" 2>/dev/null; j=0; '
        'while kill -0 "$child" 2>/dev/null && [ "$j" -lt 50 ]; do sleep 0.1; j=$((j+1)); done; '
        'kill -9 "$child" 2>/dev/null; }',
        'abort() { trap - PIPE HUP INT TERM; end_child; drop_entry "$d"; exit 1; }',
        "trap abort PIPE HUP INT TERM",
        f'mkdir -p {SESSIONS_ROOT} && chmod 700 "$HOME"/.jlremote {SESSIONS_ROOT} && mkdir "$d" '
        "|| { echo 'jlremote: cannot create the session directory' >&2; "
        f"exit {RC_SESSION_DIR}; }}",
        f"if [ ${{#d}} -gt {MAX_RUNTIME_DIR} ]; then "
        'rt=$(mktemp -d /tmp/jlremote-XXXXXXXX) && printf \'%s\\n\' "$rt" > "$d/run" || '
        + _fail(RC_SESSION_DIR, q("jlremote: cannot create a private directory in /tmp"))
        + "; fi",
        f"IFS= read -r t || {_fail(RC_NO_TOKEN, q('jlremote: no token on stdin'))}",
        # The server reads its token from this 0600 file (umask 077; printf is a builtin):
        # it is not in the environment that kernels and terminals inherit.
        """printf '%s' "$t" > "$d/token"; t=""",
        "unset JUPYTER_TOKEN",
        'export JUPYTER_TOKEN_FILE="$d/token" JUPYTER_RUNTIME_DIR="$rt"',
        f"printf '%s\\n' {q(spec.name)} > \"$d/name\"",
        f"printf '%s\\n' {spec.subcommand} > \"$d/kind\"",
    ]
    if spec.env:
        lines.append(
            "{\n"
            + spec.env
            + "\n} </dev/null >&2 || "
            + _fail(RC_ENV_FAILED, q("jlremote: the --env snippet failed on the remote"))
        )
    if spec.directory:
        where = remote_path_expr(spec.directory)
        lines.append(
            f"cd {where} 2>/dev/null || "
            + _fail(RC_NO_DIR, q(f"jlremote: remote directory not found: {spec.directory}"))
        )
    else:
        lines.append('cd "$HOME"')
    lines += [
        f"command -v {q(spec.jupyter)} >/dev/null 2>&1 || "
        + _fail(RC_NOT_FOUND, q(f"jlremote: '{spec.jupyter}' not found on the remote")),
        # setsid: own session, so no hang-up reaches it; stdin from /dev/null, no pty.
        "s=; command -v setsid >/dev/null 2>&1 && s=setsid",
        f'$s nohup {server} </dev/null >"$d/server.log" 2>&1 &',
        "child=$!",
        f"deadline=$(( $(date +%s) + {wait_s} ))",
        "f=",
        "while :; do",
        '  for c in "$rt"/jpserver-*.json "$rt"/nbserver-*.json; do',
        # The file is written in pieces: a closing brace in column 0 means it is complete.
        '    if [ -f "$c" ] && grep -q "^}" "$c"; then f=$c; break; fi',
        "  done",
        '  [ -n "$f" ] && break',
        '  kill -0 "$child" 2>/dev/null || '
        + _fail(RC_SERVER_EXITED, q("jlremote: the server exited during start-up"), tail_log=True),
        '  if [ "$(date +%s)" -ge "$deadline" ]; then',
        "    end_child",
        "    "
        + _fail(
            RC_SERVER_TIMEOUT,
            q(f"jlremote: the server did not start within {spec.timeout:g}s"),
            tail_log=True,
        ),
        "  fi",
        "  echo JLREMOTE-WAIT",
        # A short tick: every tick of delay here is delay to the user's URL.
        "  sleep 0.02",
        "done",
        "pid=${f##*-}; pid=${pid%.json}",
        'st=$(TZ=UTC LC_ALL=C ps -o lstart= -p "$pid")',
        'ar=$(ps -ww -o args= -p "$pid")',
        """printf '%s\\n' "$pid" > "$d/server.pid\"""",
        """printf '%s\\n' "$st" > "$d/server.start\"""",
        """printf '%s\\n' "$ar" > "$d/server.args\"""",
        """printf 'JLREMOTE-PID %s\\n' "$pid\"""",
        """printf 'JLREMOTE-START %s\\n' "$st\"""",
        """printf 'JLREMOTE-ARGS %s\\n' "$ar\"""",
        """printf 'JLREMOTE-DIR %s\\n' "$d\"""",
        "echo JLREMOTE-INFO",
        'cat "$f"',
        "echo",
        "echo JLREMOTE-END",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class LaunchReport:
    """What the launch script reported about the server it started."""

    pid: int
    started: str
    cmdline: str
    session_dir: str
    port: int
    base_url: str
    version: str
    sock: str = ""
    # Set when the report is of a server that was already running (an attach).
    session_id: str = ""
    name: str = ""
    kind: str = ""
    token: str = ""


def parse_list_output(stdout: str) -> list[LaunchReport]:
    """The entries printed by scan (list_script, or a launch script that attached)."""
    chunks: list[list[str]] = []
    for line in stdout.splitlines():
        if line.startswith("JLREMOTE-ENTRY "):
            chunks.append([])
        if chunks:
            chunks[-1].append(line)
    # An id read back from the remote names files and sockets here: whole ids only.
    return [
        parse_launch_output("\n".join(chunk))
        for chunk in chunks
        if is_session_id(chunk[0].removeprefix("JLREMOTE-ENTRY "))
    ]


def split_info(stdout: str) -> tuple[list[str], list[str] | None]:
    """The lines outside a `JLREMOTE-INFO` ... `JLREMOTE-END` block (a server's runtime
    JSON), and the block's lines (None when there is no block)."""
    outside: list[str] = []
    info: list[str] | None = None
    in_info = False
    for line in stdout.splitlines():
        if in_info:
            if line == "JLREMOTE-END":
                in_info = False
            else:
                info.append(line)  # type: ignore[union-attr]
        elif line == "JLREMOTE-INFO":
            in_info, info = True, []
        else:
            outside.append(line)
    return outside, info


def parse_launch_output(stdout: str) -> LaunchReport:
    """Parse the launch script's stdout (noise from the user's shell start-up is ignored)."""
    fields: dict[str, str] = {}
    outside, block = split_info(stdout)
    info = block or []
    for line in outside:
        if line.startswith("JLREMOTE-") and " " in line:
            key, _, value = line.partition(" ")
            fields[key] = value
    entry = fields.get("JLREMOTE-ENTRY", "")
    try:
        if entry and not is_session_id(entry):
            raise ValueError(f"bad session id {entry!r}")
        data = json.loads("\n".join(info))
        return LaunchReport(
            pid=int(fields["JLREMOTE-PID"]),
            started=fields["JLREMOTE-START"],
            cmdline=fields["JLREMOTE-ARGS"],
            session_dir=fields["JLREMOTE-DIR"],
            port=int(data["port"]),
            base_url=str(data.get("base_url") or "/"),
            version=str(data.get("version", "")),
            sock=str(data.get("sock") or ""),
            session_id=entry,
            name=fields.get("JLREMOTE-NAME", ""),
            kind=fields.get("JLREMOTE-KIND", ""),
            token=str(data.get("token") or ""),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise JlremoteError(
            "could not understand the remote's answer (is the login shell POSIX-like?)",
            ExitCode.SERVER,
        ) from exc


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


_IDENTITY_CHECK = (
    # is_ours PID START ARGS: is PID alive and still the very process we started?
    "is_ours() {\n"
    '  kill -0 "$1" 2>/dev/null || return 1\n'
    '  case "$(ps -o stat= -p "$1")" in Z*) return 1;; esac\n'
    '  [ "$(TZ=UTC LC_ALL=C ps -o lstart= -p "$1")" = "$2" ] || return 2\n'
    '  [ "$(ps -ww -o args= -p "$1")" = "$3" ] || return 2\n'
    "}\n"
)


# The session directory may name (in its `run` file) a short runtime directory elsewhere:
# the server's runtime JSON, its socket and its kernels' sockets are there.
_SESSION_FILES = (
    'rundir() { if [ -f "$1/run" ]; then cat "$1/run"; else printf \'%s\\n\' "$1"; fi; }\n'
    'drop_entry() { r=$(rundir "$1"); [ "$r" = "$1" ] || rm -rf "$r"; rm -rf "$1"; }\n'
)

# owns_port PID PORT: does PID hold the listening TCP socket on PORT? (Linux: its fds
# against /proc/net/tcp*; elsewhere lsof.) What a process of another user listening on a
# dead server's port cannot fake.
_OWNS_PORT = (
    "owns_port() {\n"
    "  if [ -r /proc/net/tcp ]; then\n"
    "    h=$(printf ':%04X' \"$2\")\n"
    '    for i in $(awk -v h="$h" \'$4 == "0A" && substr($2, length($2) - 4) == h '
    "{ print $10 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null); do\n"
    '      ls -l "/proc/$1/fd" 2>/dev/null | grep -q "socket:\\[$i\\]" && return 0\n'
    "    done\n"
    "    return 1\n"
    "  fi\n"
    '  lsof -nP -a -p "$1" -iTCP:"$2" -sTCP:LISTEN >/dev/null 2>&1\n'
    "}\n"
)


# ---- Slurm jobs: how the scripts ask about one (also used by slurm.py) -----------------

# Job states in which the job may still run (or soon will): anything else has ended.
JOB_ACTIVE_STATES = (
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
)
_ACTIVE = "|".join(JOB_ACTIVE_STATES)
_SQUEUE_FORMAT = "%T|%r|%N|%L|%k"

# `job_state JOB` prints `STATE|REASON|NODES|TIMELEFT|COMMENT`, or nothing once Slurm has
# forgotten the job (squeue: "Invalid job id"), and fails when Slurm cannot tell (the
# controller is down or slow): a caller must never take that for "ended".
JOB_STATE = (
    "job_state() {\n"
    f'  o=$(squeue -h -t all -j "$1" -o {q(_SQUEUE_FORMAT)} 2>&1) && '
    "{ printf '%s\\n' \"$o\" | grep '|' | head -n 1; return 0; }\n"
    '  case "$o" in *"Invalid job id"*) return 0;; esac\n'
    "  return 1\n"
    "}\n"
)


def check_job_id(job_id: str) -> str:
    """A job id goes into scripts only if it is all digits."""
    if not is_job_id(job_id):
        raise ValueError(f"bad job id {job_id!r}")
    return job_id


def job_comment(session_id: str) -> str:
    """The job's comment: with the job id it proves a job is this session's."""
    return f"jlremote:{session_id}"


# The remote session directories are the registry: each holds name, kind, server.pid,
# server.start, server.args and the server's runtime JSON (0600, token included).
_REGISTRY = (
    JOB_STATE
    + _SESSION_FILES
    + r"""report_entry() {
  e=$1; f=; r=$(rundir "$e")
  for c in "$r"/jpserver-*.json "$r"/nbserver-*.json "$e"/jpserver-*.json; do
    if [ -f "$c" ]; then f=$c; break; fi
  done
  [ -n "$f" ] || return 1
  printf 'JLREMOTE-ENTRY %s
' "${e##*/}"
  printf 'JLREMOTE-NAME %s
' "$(cat "$e/name" 2>/dev/null)"
  printf 'JLREMOTE-KIND %s
' "$(cat "$e/kind" 2>/dev/null)"
  printf 'JLREMOTE-PID %s
' "$(cat "$e/server.pid")"
  printf 'JLREMOTE-START %s
' "$(cat "$e/server.start")"
  printf 'JLREMOTE-ARGS %s
' "$(cat "$e/server.args")"
  printf 'JLREMOTE-DIR %s
' "$e"
  echo JLREMOTE-INFO
  cat "$f"
  echo
  echo JLREMOTE-END
}
scan() {
  for e in "$HOME"/.jlremote/sessions/*; do
    if [ -f "$e/job.id" ]; then
      # A server in a Slurm job: not on this host, so not attachable here. Its directory
      # goes once Slurm says the job has ended (never when squeue cannot tell).
      command -v squeue >/dev/null 2>&1 || continue
      js=$(job_state "$(cat "$e/job.id")") || continue
      case "${js%%|*}" in ACTIVE_STATES) ;; *) drop_entry "$e";; esac
      continue
    fi
    [ -f "$e/server.pid" ] || continue
    p=$(cat "$e/server.pid"); st=$(cat "$e/server.start" 2>/dev/null)
    if is_ours "$p" "$st" "$(cat "$e/server.args" 2>/dev/null)"; then
      if [ -z "$1" ]; then report_entry "$e"
      elif [ "$(cat "$e/name" 2>/dev/null)" = "$1" ]; then report_entry "$e" && return 0
      fi
    else
      drop_entry "$e"
    fi
  done
}
""".replace("ACTIVE_STATES", _ACTIVE)
)


def list_script() -> str:
    """Report every live jlremote server of this user on the remote (`JLREMOTE-ENTRY`
    blocks) and remove the directories of dead ones."""
    return _IDENTITY_CHECK + _REGISTRY + "scan ''\n"


def probe_script(servers: list[ServerIdentity]) -> str:
    """Report `JLREMOTE-PROBE SESSION_ID running|gone|foreign` for each server.

    `foreign` means the PID is alive but is another process now (PID reuse).
    """
    lines = [_IDENTITY_CHECK.rstrip("\n"), _OWNS_PORT.rstrip("\n")]
    lines.append(
        # With a port (a TCP server), the port must still be the server's own: once it has
        # died, another user may listen there, and answer anything.
        'probe() { is_ours "$2" "$3" "$4"; r=$?; '
        'if [ "$r" = 0 ] && [ "$5" != 0 ] && ! owns_port "$2" "$5"; then r=1; fi; case $r in '
        "0) s=running;; 1) s=gone;; *) s=foreign;; esac; "
        'printf \'JLREMOTE-PROBE %s %s\\n\' "$1" "$s"; }'
    )
    if any(srv.job_id for srv in servers):
        # A job's server runs while the job is RUNNING with our comment; the state line
        # (`JLREMOTE-JOB SESSION STATE|REASON|NODE|LEFT|COMMENT`) goes to status as is.
        # When Slurm cannot tell, nothing is said of the session (status: unknown).
        lines.append(JOB_STATE.rstrip("\n"))
        lines.append(
            'probe_job() { js=$(job_state "$2") || return 0; '
            """printf 'JLREMOTE-JOB %s %s\\n' "$1" "$js"; case "$js" in """
            '"RUNNING|"*"|$3") s=running;; *"|$3") s=gone;; "") s=gone;; *) s=foreign;; esac; '
            'printf \'JLREMOTE-PROBE %s %s\\n\' "$1" "$s"; }'
        )
    for srv in servers:
        session_dir_expr(srv.session_id)  # validates the id
        if srv.job_id:
            job = check_job_id(srv.job_id)
            lines.append(f"probe_job {q(srv.session_id)} {job} {q(job_comment(srv.session_id))}")
        else:
            lines.append(
                f"probe {q(srv.session_id)} {srv.pid:d} {q(srv.started)} {q(srv.cmdline)} "
                f"{srv.port:d}"
            )
    return "\n".join(lines) + "\n"


def parse_probe_jobs(stdout: str) -> dict[str, str]:
    """Map session id to the squeue line probe_script printed for its job."""
    result: dict[str, str] = {}
    for line in stdout.splitlines():
        if line.startswith("JLREMOTE-JOB "):
            _, sid, rest = (line + " ").split(" ", 2)
            result[sid] = rest.strip()
    return result


def parse_probe_output(stdout: str) -> dict[str, str]:
    """Map session id to `running`, `gone` or `foreign`."""
    result: dict[str, str] = {}
    for line in stdout.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == "JLREMOTE-PROBE":
            result[parts[1]] = parts[2]
    return result


def stop_script(server: ServerIdentity, grace: float = 10.0) -> str:
    """Stop exactly our server: TERM once proven ours, KILL only if still there after
    `grace` seconds; then remove the session directory. Prints `JLREMOTE-STOP STATE` with
    STATE one of stopped, killed, gone, foreign."""
    d = session_dir_expr(server.session_id)
    ticks = max(1, int(grace * 10))
    if server.job_id:
        return _stop_job_script(server, d, ticks)
    lines = [
        _IDENTITY_CHECK.rstrip("\n"),
        _SESSION_FILES.rstrip("\n"),
        f"d={d}",
        f"p={server.pid:d}; st={q(server.started)}; ar={q(server.cmdline)}",
        'is_ours "$p" "$st" "$ar"; r=$?',
        "state=gone",
        'if [ "$r" = 2 ]; then state=foreign; fi',
        'if [ "$r" = 0 ]; then',
        '  kill -TERM "$p"; state=stopped; i=0',
        f'  while is_ours "$p" "$st" "$ar" && [ "$i" -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done',
        '  if is_ours "$p" "$st" "$ar"; then kill -KILL "$p"; state=killed; fi',
        "fi",
        'drop_entry "$d"',
        """printf 'JLREMOTE-STOP %s\\n' "$state\"""",
    ]
    return "\n".join(lines) + "\n"


def _stop_job_script(server: ServerIdentity, d: str, ticks: int) -> str:
    """scancel our job (job id + our comment; Slurm sends TERM, then KILL after its
    KillWait), wait for it to end, `scancel -s KILL` if it outlives the grace time."""
    lines = [
        JOB_STATE.rstrip("\n"),
        f"d={d}; j={check_job_id(server.job_id)}; c={q(job_comment(server.session_id))}",
        # Slurm must answer first: a job it cannot tell about is neither ours nor ended,
        # and its directory (token, log) stays until it can.
        's=$(job_state "$j") || { echo "jlremote: Slurm did not answer about job $j '
        '(is slurmctld up?)" >&2; exit 1; }',
        'mine() { case "$s" in *"|$c") return 0;; esac; return 1; }',
        # While waiting, a Slurm that does not answer counts as the job still running.
        'live() { s=$(job_state "$j") || return 0; case "${s%%|*}" in '
        + _ACTIVE
        + ") return 0;; esac; return 1; }",
        "state=gone",
        "if mine && live; then",
        '  scancel "$j"; state=stopped; i=0',
        f'  while live && [ "$i" -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done',
        '  if live; then scancel -s KILL "$j"; state=killed; fi',
        "elif live; then state=foreign; fi",
        'rm -rf "$d"',
        """printf 'JLREMOTE-STOP %s\\n' "$state\"""",
    ]
    return "\n".join(lines) + "\n"


def parse_stop_output(stdout: str) -> str | None:
    """The state reported by stop_script, or None if it did not get that far."""
    for line in stdout.splitlines():
        if line.startswith("JLREMOTE-STOP "):
            return line.split(" ", 1)[1]
    return None


# ---- doctor and logs -------------------------------------------------------------------


def doctor_script(env: str | None, jupyter: str, slurm: bool = False) -> str:
    """What `doctor` asks the remote, in one go: the shell, the OS, `jupyter` after the
    profile's --env snippet and its package versions, free space in the home, and the
    jlremote sessions running there (JLREMOTE-ENTRY blocks, as list_script). With SLURM,
    also where sbatch, squeue and scancel are (before --env: `start` needs them there)
    and the partitions with their availability."""
    lines = []
    if slurm:
        lines += [
            "for c in sbatch squeue scancel; do "
            """printf 'JLREMOTE-SLURM-BIN %s %s\n' "$c" "$(command -v "$c" 2>/dev/null)"; done""",
            "sinfo -h -o '%P %a' 2>/dev/null | sed 's/^/JLREMOTE-SLURM-PART /'",
        ]
    lines += [
        """printf 'JLREMOTE-SHELL %s\\n' "${SHELL:-unknown}\"""",
        """printf 'JLREMOTE-HOME %s\\n' "$HOME\"""",
        """printf 'JLREMOTE-OS %s\\n' "$(uname -sr 2>/dev/null)\"""",
        """printf 'JLREMOTE-DF %s\\n' "$(df -Pk "$HOME" 2>/dev/null | awk 'NR==2 {print $4}')\"""",
        _IDENTITY_CHECK.rstrip("\n"),
        _REGISTRY.rstrip("\n"),
        "scan ''",
    ]
    if env:
        lines.append("{\n" + env + "\n} </dev/null >/dev/null 2>&1 || echo JLREMOTE-ENV-FAILED")
    lines += [
        f"p=$(command -v {q(jupyter)} 2>/dev/null)",
        """printf 'JLREMOTE-JUPYTER %s\\n' "$p\"""",
        'if [ -n "$p" ]; then',
        f"  {q(jupyter)} --version 2>/dev/null | sed -n 's/^\\([a-z_]*\\) *: *\\(.*\\)$/"
        "JLREMOTE-V \\1 \\2/p'",
        "fi",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DoctorReport:
    """What doctor_script printed."""

    shell: str = ""
    os: str = ""
    free_kb: int | None = None
    env_failed: bool = False
    jupyter: str = ""
    versions: dict[str, str] | None = None
    sessions: tuple[str, ...] = ()
    slurm_missing: tuple[str, ...] = ()  # of sbatch, squeue, scancel
    partitions: dict[str, str] | None = None  # name ("*" marks the default) -> up/down/...
    home: str = ""


def parse_doctor_output(stdout: str) -> DoctorReport:
    fields: dict[str, str] = {}
    versions: dict[str, str] = {}
    missing: list[str] = []
    partitions: dict[str, str] = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "JLREMOTE-V":
            package, _, version = value.partition(" ")
            versions[package] = version.strip()
        elif key == "JLREMOTE-SLURM-BIN":
            command, _, path = value.partition(" ")
            if not path.strip():
                missing.append(command)
        elif key == "JLREMOTE-SLURM-PART":
            name, _, avail = value.partition(" ")
            partitions[name] = avail.strip()
        elif key.startswith("JLREMOTE-"):
            fields.setdefault(key, value.strip())
    free = fields.get("JLREMOTE-DF", "")
    names = tuple(entry.name for entry in parse_list_output(stdout))
    return DoctorReport(
        shell=fields.get("JLREMOTE-SHELL", ""),
        home=fields.get("JLREMOTE-HOME", ""),
        os=fields.get("JLREMOTE-OS", ""),
        free_kb=int(free) if free.isdigit() else None,
        env_failed="JLREMOTE-ENV-FAILED" in stdout.split(),
        jupyter=fields.get("JLREMOTE-JUPYTER", ""),
        versions=versions,
        sessions=names,
        slurm_missing=tuple(missing),
        partitions=partitions,
    )


# A listener on a Unix socket and on 127.0.0.1 (any port) that greets one client each,
# so that the local side can test both kinds of forwarding for real; gone in 15 s.
_GREETER = """import os, select, shutil, socket, sys
d, sock = sys.argv[1], sys.argv[2]
u = socket.socket(socket.AF_UNIX); u.bind(sock); u.listen(1)
t = socket.socket(); t.bind(("127.0.0.1", 0)); t.listen(1)
with open(d + "/port.tmp", "w") as f: f.write(str(t.getsockname()[1]))
os.rename(d + "/port.tmp", d + "/port")
left = [u, t]
try:
    while left:
        ready = select.select(left, [], [], 15)[0]
        if not ready: break
        for s in ready:
            c = s.accept()[0]; c.sendall(b"jlremote-ok\\n"); c.close(); left.remove(s)
finally:
    shutil.rmtree(os.path.dirname(sock), ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)
"""
GREETING = b"jlremote-ok\n"


def forward_probe_script(probe_id: str, env: str | None) -> str:
    """Start _GREETER (with the remote's python3, after --env) in a private directory and
    print `JLREMOTE-FWD PORT SOCKET`, or `JLREMOTE-FWD -` when there is no python3."""
    d = f'"$HOME"/.jlremote/doctor-{q(probe_id)}'
    if not is_session_id(probe_id):
        raise ValueError(f"bad probe id {probe_id!r}")
    lines = ["umask 077"]
    if env:
        lines.append("{\n" + env + "\n} </dev/null >/dev/null 2>&1")
    lines += [
        "py=$(command -v python3 || command -v python) || { echo 'JLREMOTE-FWD -'; exit 0; }",
        f'd={d}; mkdir -p "$HOME"/.jlremote && chmod 700 "$HOME"/.jlremote && mkdir "$d" || exit 1',
        # The socket as start would make it: in a short 0700 directory when the home is
        # too deep for a socket path.
        "r=$d; if [ ${#d} -gt 90 ]; then r=$(mktemp -d /tmp/jlremote-XXXXXXXX) || exit 1; fi",
        """printf '%s\\n' "$r" > "$d/run\"""",
        # In its private directory: `-c` puts the working directory on the import path.
        'cd "$d" || exit 1',
        f'setsid nohup "$py" -c {q(_GREETER)} "$d" "$r/s" </dev/null >/dev/null 2>&1 &',
        """printf '%s\\n' "$!" > "$d/pid\"""",
        'i=0; while [ ! -s "$d/port" ] && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i+1)); done',
        """printf 'JLREMOTE-FWD %s %s\\n' "$(cat "$d/port" 2>/dev/null || echo -)" "$r/s\"""",
    ]
    return "\n".join(lines) + "\n"


def log_script(session_id: str, lines: int, follow: bool) -> str:
    """The last LINES lines of a session's server log. With FOLLOW, new lines too, until
    the session directory goes (the session was stopped) or the client does: the local
    side holds ssh's stdin open, so its end is the remote's EOF (no stray `tail` stays)."""
    d = session_dir_expr(session_id)
    out = [
        f"d={d}",
        '[ -f "$d/server.log" ] || { echo '
        "'jlremote: the server log is gone (the session has ended)' >&2; "
        f"exit {RC_NO_ENTRY}; }}",
    ]
    if not follow:
        return "\n".join([*out, f'exec tail -n {lines:d} "$d/server.log"']) + "\n"
    out += [
        f'tail -n {lines:d} -F "$d/server.log" 2>/dev/null & t=$!',
        # A background job's stdin is /dev/null unless redirected: give it ours (fd 3).
        "exec 3<&0",
        '( cat <&3 >/dev/null; kill "$t" 2>/dev/null ) & w=$!',
        "exec 3<&-",
        'while kill -0 "$t" 2>/dev/null && [ -d "$d" ]; do sleep 1; done',
        'kill "$t" "$w" 2>/dev/null',
        "exit 0",
    ]
    return "\n".join(out) + "\n"


def forward_probe_cleanup(probe_id: str) -> str:
    """Stop the greeter of forward_probe_script if it still waits (a forward that did not
    work never reached it): only the process whose command line names its directory."""
    if not is_session_id(probe_id):
        raise ValueError(f"bad probe id {probe_id!r}")
    d = f'"$HOME"/.jlremote/doctor-{probe_id}'
    return (
        _SESSION_FILES + f"d={d}\n"
        'p=$(cat "$d/pid" 2>/dev/null)\n'
        'if [ -n "$p" ]; then case "$(ps -ww -o args= -p "$p")" in *"$d"*) kill "$p";; esac; fi\n'
        'drop_entry "$d"\n'
    )
