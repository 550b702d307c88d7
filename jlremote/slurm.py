"""Slurm, as jlremote speaks it: the user's `--sbatch` options as checked words, and what
squeue says about a job.

The flow (the scripts are jlremote/sh/submit.sh, job.sh, poll.sh, route.sh, cancel.sh): a
submit script on the login host makes the private session directory, stores the token
there (0600, read from stdin), leaves the job script and what it runs next to it and runs
`sbatch` with the user's options as separate words. The job script runs on the compute
node: it reads the token from that file, serves on the node (a private socket or the
node's cluster address), and the server's own runtime file (in the session directory, on
the shared home) tells the login host where. A poll script, run as often as needed,
reports the job's state and, once the server is up, that file.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from jlremote import untrusted
from jlremote.errors import ExitCode, JlremoteError

# Job states in which the job may still run (or soon will): anything else has ended
# (lib.sh's job_active; test_slurm_words holds the two equal).
ACTIVE_STATES = (
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
# Job states of a job waiting to run (lib.sh's job_queued, for probe.sh's `queued`).
QUEUED_STATES = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")
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


# Under this much walltime left, `status` warns (and the job's server is told to shut
# down cleanly WARN_SIGNAL_LEAD seconds before the end: sbatch --signal).
ENDING_SOON = 600
WARN_SIGNAL_LEAD = 60
WARN_SIGNAL = f"--signal=B:USR1@{WARN_SIGNAL_LEAD}"


@dataclass(frozen=True)
class JobState:
    """One line of squeue about our job; `state` is "" once Slurm has forgotten it.
    `start` is Slurm's estimated start time of a pending job (its local time, ISO), ""
    when it has none."""

    state: str = ""
    reason: str = ""
    node: str = ""
    time_left: str = ""
    comment: str = ""
    start: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def queued(self) -> bool:
        """Waiting to run (pending, or requeued, held, configuring its nodes)."""
        return self.state in QUEUED_STATES

    @property
    def seconds_left(self) -> int | None:
        """The walltime left (squeue's %L: `M:SS`, `H:MM:SS`, `D-HH:MM:SS`) in seconds;
        None when unlimited or unknown."""
        days, _, clock = self.time_left.rpartition("-")
        parts = clock.split(":")
        if not all(p.isdigit() for p in parts) or not 2 <= len(parts) <= 3:
            return None
        if days and not days.isdigit():
            return None
        total = 0
        for p in parts:
            total = total * 60 + int(p)
        return total + int(days or 0) * 86400

    @property
    def ending_soon(self) -> bool:
        left = self.seconds_left
        return self.state == "RUNNING" and left is not None and left < ENDING_SOON

    @property
    def notes(self) -> str:
        """Why it waits and when Slurm expects it to start, as said to users:
        ` (Resources; estimated start 2026-12-02T14:05:00)`, or "" when Slurm says neither."""
        said = [n for n in (self.reason, self.start and f"estimated start {self.start}") if n]
        return f" ({'; '.join(said)})" if said else ""


def ended_early(job: JobState) -> str:
    """Why a queued job's session ended, as `status` says it: `job cancelled before its
    server started (REASON)`."""
    said = job.state.lower() if job.state else "ended"
    return f"job {said} before its server started" + (f" ({job.reason})" if job.reason else "")


def parse_job_state(line: str) -> JobState:
    """`PENDING|Resources|(null)|1:00:00|2026-12-02T14:05:00|jlremote:abc` as a JobState
    (blank: forgotten)."""
    parts = line.strip().split("|")
    if len(parts) < 6 or not parts[0]:
        return JobState()
    state, reason, node, left, start, note = (untrusted.text(p, 200) for p in parts[:6])
    node = "" if node == "(null)" else node
    return JobState(
        state=state.split()[0] if state.split() else "",
        reason="" if reason in ("None", "(null)") else reason,
        # A node name goes to ssh (%h) and to the screen: a strange one is not used.
        node=node if untrusted.is_host_name(node) else "",
        time_left=left,
        comment="" if note == "(null)" else note,
        start=start if start[:1].isdigit() else "",
    )


def with_warning_signal(words: tuple[str, ...]) -> tuple[str, ...]:
    """The user's sbatch words, plus our --signal (the server's clean shutdown before the
    time limit) unless they ask for a signal of their own."""
    if any(w == "--signal" or w.startswith("--signal=") for w in words):
        return words
    return (*words, WARN_SIGNAL)
