"""Pure builders of the scripts that run JupyterLab in a Slurm batch job, and parsers of
what they print back.

The flow: a submit script on the login host makes the private session directory, stores
the token there (0600, read from stdin), writes the job script next to it and runs `sbatch`
with the user's options as separate quoted words. The job script runs on the compute node:
it reads the token from that file, serves on the node's cluster address on a port the
kernel picks, and the server's own runtime file (in the session directory, on the shared
home) tells the login host the port. A poll script, run as often as needed, reports the
job's state and, once the server is up, that file.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from jlremote import scripts
from jlremote.errors import ExitCode, JlremoteError

q = shlex.quote

RC_NO_SBATCH = 87
RC_SBATCH_FAILED = 88
# How long a running job waits for its client to say how it reaches the node (in 0.02 s
# ticks: 2 minutes; the server's start-up waits for the answer).
ROUTE_WAIT_TICKS = 6000
ROUTES = ("sock", "tcp")

ACTIVE_STATES = scripts.JOB_ACTIVE_STATES
check_job_id = scripts.check_job_id
comment = scripts.job_comment
# Options jlremote sets itself: the user's --sbatch must not change them.
_OWN_OPTIONS = ("--wrap", "--parsable", "--comment", "--output", "-o", "--error", "-e")


def parse_sbatch_options(text: str) -> tuple[str, ...]:
    """The user's `--sbatch` string as separate words (shell-like quoting allowed).

    Options jlremote sets itself (and `--wrap`, which would replace the job script) are
    refused, and so is anything that is not an option or an option's value.
    """
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise JlremoteError(f"cannot parse --sbatch {text!r}: {exc}", ExitCode.USAGE) from None
    for i, word in enumerate(words):
        name = word.split("=", 1)[0]
        if _is_own_option(name):
            raise JlremoteError(
                f"--sbatch may not set {name}: jlremote writes the job script and sets the "
                "job's output file and comment itself",
                ExitCode.USAGE,
            )
        if not word.startswith("-") and (i == 0 or not _takes_value(words[i - 1])):
            raise JlremoteError(
                f"--sbatch takes options only, not {word!r} (jlremote writes the job script)",
                ExitCode.USAGE,
            )
    return tuple(words)


def _is_own_option(name: str) -> bool:
    """NAME is one of ours, `-oFILE`/`-eFILE`, or a prefix of one of our long options,
    which sbatch (getopt_long) takes for the whole option: `--out=x`, `--comm=x`."""
    if name in _OWN_OPTIONS or (len(name) > 2 and name[:2] in ("-o", "-e")):
        return True
    return (
        name.startswith("--")
        and len(name) > 2
        and any(own.startswith(name) for own in _OWN_OPTIONS if own.startswith("--"))
    )


def partition_of(words: tuple[str, ...]) -> str | None:
    """The partition the sbatch words ask for (`-p X`, `--partition X|=X`), if any."""
    for i, word in enumerate(words):
        if word in ("-p", "--partition") and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--partition="):
            return word.split("=", 1)[1]
        if word.startswith("-p") and len(word) > 2:
            return word[2:]
    return None


def _takes_value(word: str) -> bool:
    """Whether WORD is an option whose value is the next word (`-p gpu`, `--time 1:00`)."""
    if not word.startswith("-") or "=" in word:
        return False
    if word.startswith("--"):
        return word not in _FLAGS
    return len(word) == 2 and word not in _SHORT_FLAGS


# sbatch options that take no value (the others do).
_FLAGS = frozenset(
    {
        "--exclusive",
        "--hold",
        "--ignore-pbs",
        "--no-kill",
        "--no-requeue",
        "--overcommit",
        "--quiet",
        "--requeue",
        "--spread-job",
        "--test-only",
        "--use-min-nodes",
        "--verbose",
        "--wait",
        "--contiguous",
        "--oversubscribe",
        "--reboot",
        "--get-user-env",
        "--kill-on-invalid-dep",
    }
)
_SHORT_FLAGS = frozenset({"-H", "-I", "-k", "-O", "-Q", "-s", "-v", "-W", "-h", "-V"})


@dataclass(frozen=True)
class JobSpec:
    """What to run in the job, and how to submit it."""

    launch: scripts.LaunchSpec
    sbatch: tuple[str, ...] = ()


def job_script(spec: scripts.LaunchSpec) -> str:
    """The batch script: runs on the compute node with the session directory as $1.

    It holds no secret (admins and `scontrol` can read job scripts): the token is read from
    the 0600 file the submit script left in the session directory.
    """
    argv = [spec.jupyter, spec.subcommand, "--no-browser", *scripts.KERNEL_OPTIONS]
    if spec.allow_root:
        argv.append("--allow-root")
    server = " ".join(q(a) for a in argv)
    say = "printf 'jlremote: %s\\n' "
    lines = [
        "#!/bin/bash",
        f"# jlremote: JupyterLab for session {spec.name} ({spec.session_id}).",
        "umask 077",
        'd=$1; rt=$d; cd "$HOME" || exit 1',
        f"[ -s \"$d/token\" ] || {{ {say}'no token in the session directory'; "
        f"exit {scripts.RC_NO_TOKEN}; }}",
        # Kernel sockets must fit a Unix socket address: a deep home gets a short private
        # directory on the node (see scripts.MAX_RUNTIME_DIR).
        f"if [ ${{#d}} -gt {scripts.MAX_RUNTIME_DIR} ]; then "
        "rt=$(mktemp -d /tmp/jlremote-XXXXXXXX) || exit 1; fi",
        # The token from its 0600 file, not the environment kernels inherit.
        "unset JUPYTER_TOKEN",
        'export JUPYTER_TOKEN_FILE="$d/token" JUPYTER_RUNTIME_DIR="$rt"',
        # First the node (the client tries to reach it while --env and the rest run): its
        # address as the rest of the cluster (the login host too) uses it.
        "node=${SLURMD_NODENAME:-$(hostname -s)}",
        'addr=$(scontrol show node "$node" 2>/dev/null '
        "| sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' | head -n 1)",
        '[ -n "$addr" ] || addr=$(hostname)',
        """printf '%s %s\\n' "$node" "$addr" > "$d/node\"""",
    ]
    if spec.env:
        lines.append(
            "{\n" + spec.env + f"\n}} </dev/null || {{ {say}'the --env snippet failed in the job'; "
            f"exit {scripts.RC_ENV_FAILED}; }}"
        )
    if spec.directory:
        lines.append(
            f"cd {scripts.remote_path_expr(spec.directory)} || "
            f"{{ {say}{q(f'remote directory not found: {spec.directory}')}; "
            f"exit {scripts.RC_NO_DIR}; }}"
        )
    lines += [
        f"command -v {q(spec.jupyter)} >/dev/null 2>&1 || "
        f"{{ {say}{q(f'{spec.jupyter!r} not found on the compute node')}; "
        f"exit {scripts.RC_NOT_FOUND}; }}",
        # The client says how it reaches this node (set_route_script): `sock` when its ssh
        # gets here through the login host (a private socket), `tcp` otherwise.
        f'i=0; while [ ! -s "$d/route" ] && [ "$i" -lt {ROUTE_WAIT_TICKS} ]; do '
        "sleep 0.02; i=$((i+1)); done",
        'route=$(cat "$d/route" 2>/dev/null)',
        f'[ -n "$route" ] || {{ {say}\'no client asked for the server (was start '
        f"interrupted?)'; exit {scripts.RC_SERVER_TIMEOUT}; }}",
        # The login host reads the server's runtime file on the shared home: copy it there
        # from a node-local runtime directory ($$ is the server once exec'd).
        'if [ "$rt" != "$d" ]; then ( while kill -0 $$ 2>/dev/null; do '
        'for c in "$rt"/jpserver-*.json; do if [ -f "$c" ] && grep -q "^}" "$c"; then '
        'cp "$c" "$d"/ && exit 0; fi; done; sleep 0.1; done ) & fi',
        # exec: the server is the job's own process, so scancel signals it directly.
        f'if [ "$route" = sock ]; then exec {server} --sock="$rt"/{scripts.SOCKET_NAME}; fi',
        f'exec {server} --ip="$addr" --port=0',
    ]
    return "\n".join(lines) + "\n"


def submit_script(job: JobSpec) -> str:
    """Make the session directory, store the token (from stdin), write the job script and
    submit it. Prints `JLREMOTE-JOB <id>`; on a refusal, sbatch's own words on stderr."""
    spec = job.launch
    d = scripts.session_dir_expr(spec.session_id)
    say = "printf 'jlremote: %s\\n' "
    fail = 'rm -rf "$d"; exit'
    sbatch = [
        "sbatch",
        f"--job-name=jlremote-{spec.name}",
        *job.sbatch,
        "--parsable",
        f"--comment={comment(spec.session_id)}",
    ]
    lines = [
        "umask 077",
        f"d={d}",
        f'mkdir -p {scripts.SESSIONS_ROOT} && chmod 700 "$HOME"/.jlremote '
        f'{scripts.SESSIONS_ROOT} && mkdir "$d" '
        f"|| {{ {say}'cannot create the session directory' >&2; exit {scripts.RC_SESSION_DIR}; }}",
        f"IFS= read -r t || {{ {say}'no token on stdin' >&2; {fail} {scripts.RC_NO_TOKEN}; }}",
        """printf '%s' "$t" > "$d/token"; t=""",
        f"printf '%s\\n' {q(spec.name)} > \"$d/name\"",
        f"printf '%s\\n' {spec.subcommand} > \"$d/kind\"",
        f"printf '%s' {q(job_script(spec))} > \"$d/job.sh\"",
        "command -v sbatch >/dev/null 2>&1 || "
        f"{{ {say}'sbatch not found on the remote (is it a Slurm login node?)' >&2; "
        f"{fail} {RC_NO_SBATCH}; }}",
        f'out=$({" ".join(q(a) for a in sbatch)} --output="$d"/server.log '
        '"$d"/job.sh "$d" 2>"$d/sbatch.err")',
        f"if [ $? -ne 0 ]; then {say}'sbatch refused the job' >&2; cat \"$d/sbatch.err\" >&2; "
        f"{fail} {RC_SBATCH_FAILED}; fi",
        "job=${out%%;*}",
        """printf '%s\\n' "$job" > "$d/job.id\"""",
        """printf 'JLREMOTE-JOB %s\\n' "$job\"""",
        """printf 'JLREMOTE-DIR %s\\n' "$d\"""",
    ]
    return "\n".join(lines) + "\n"


def poll_script(session_id: str, job_id: str, ask_slurm: bool = True) -> str:
    """The job's state (`JLREMOTE-JOBSTATE` line; only with ASK_SLURM, which runs squeue)
    and, once the server has written its runtime file, the node (`JLREMOTE-NODE NAME
    ADDR`) and that file. When the job has ended, the last lines of its log go to stderr."""
    d = scripts.session_dir_expr(session_id)
    lines = [
        scripts.JOB_STATE.rstrip("\n"),
        f"d={d}; j={q(check_job_id(job_id))}",
    ]
    if ask_slurm:  # no JOBSTATE line when Slurm cannot tell: as if it was not asked
        lines.append(
            """if s=$(job_state "$j"); then printf 'JLREMOTE-JOBSTATE %s\\n' "$s"; """
            "else s=RUNNING; fi"
        )
    else:
        lines.append("s=RUNNING")  # not asked: no log tail below
    lines += [
        "f=",
        'for c in "$d"/jpserver-*.json "$d"/nbserver-*.json; do',
        '  if [ -f "$c" ] && grep -q "^}" "$c"; then f=$c; break; fi',
        "done",
        # The node as soon as the job has started there (the client picks its route then).
        """[ -f "$d/node" ] && printf 'JLREMOTE-NODE %s\\n' "$(cat "$d/node")\"""",
        'if [ -n "$f" ] && [ -f "$d/node" ]; then',
        '  echo JLREMOTE-INFO; cat "$f"; echo; echo JLREMOTE-END',
        "fi",
        'case "${s%%|*}" in ' + "|".join(ACTIVE_STATES) + ") ;;",
        f'  *) tail -n {scripts.LOG_TAIL_LINES} "$d/server.log" >&2 2>/dev/null;;',
        "esac",
    ]
    return "\n".join(lines) + "\n"


def route_script(session_id: str, route: str) -> str:
    """Tell the job how the client reaches its node (the job waits for this)."""
    if route not in ROUTES:
        raise ValueError(f"bad route {route!r}")
    d = scripts.session_dir_expr(session_id)
    return f"umask 077\nprintf '%s\\n' {route} > {d}/route\n"


def cancel_script(session_id: str, job_id: str) -> str:
    """scancel the job if it is still this session's (job id plus our comment), then
    report its last state and the tail of its log (stderr). Keeps the session directory
    (the caller removes it through stop_script, or wants the log first)."""
    d = scripts.session_dir_expr(session_id)
    lines = [
        scripts.JOB_STATE.rstrip("\n"),
        f"d={d}; j={q(check_job_id(job_id))}",
        # The job was submitted moments ago by this very start: when Slurm cannot say
        # whose it is, cancelling it anyway is right (leaving it queued is not).
        'if s=$(job_state "$j"); then',
        """  printf 'JLREMOTE-JOBSTATE %s\\n' "$s\"""",
        f'  case "$s" in *"|{comment(session_id)}") scancel "$j";; esac',
        'else scancel "$j"; fi',
        f'tail -n {scripts.LOG_TAIL_LINES} "$d/server.log" >&2 2>/dev/null',
        'rm -rf "$d"',
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class JobState:
    """One line of squeue about our job; `state` is "" once Slurm has forgotten it."""

    state: str = ""
    reason: str = ""
    node: str = ""
    time_left: str = ""
    comment: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def parse_job_state(line: str) -> JobState:
    """`RUNNING|None|node1|3:59:58|jlremote:abc` as a JobState (blank: forgotten)."""
    parts = line.strip().split("|")
    if len(parts) < 5 or not parts[0]:
        return JobState()
    state, reason, node, left, note = parts[:5]
    return JobState(
        state=state.split()[0],
        reason="" if reason in ("None", "(null)") else reason,
        node=node,
        time_left=left,
        comment="" if note == "(null)" else note,
    )


@dataclass(frozen=True)
class JobPoll:
    """What one poll learned: the job's state, and the server once it is up."""

    job: JobState | None  # None when Slurm was not asked
    node: str = ""
    address: str = ""
    info: dict[str, object] | None = None


def parse_poll_output(stdout: str) -> JobPoll:
    job: JobState | None = None
    node = address = ""
    outside, info = scripts.split_info(stdout)
    for line in outside:
        if line.startswith("JLREMOTE-JOBSTATE"):
            job = parse_job_state(line.partition(" ")[2])
        elif line.startswith("JLREMOTE-NODE "):
            words = line.split()
            node, address = [*words, "", ""][1:3]
    data: dict[str, object] | None = None
    if info is not None:
        try:
            loaded = json.loads("\n".join(info))
            data = loaded if isinstance(loaded, dict) else None
        except ValueError:
            data = None  # still being written: the next poll will see it
    return JobPoll(job, node, address, data)
