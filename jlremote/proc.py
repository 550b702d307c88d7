"""The one place where jlremote starts processes.

Every argv is a list (never a shell string) and is logged at debug level. Nothing secret is
ever put in an argv, so logging it is safe; stdin and stdout are never logged.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jlremote.errors import ExitCode, JlremoteError

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

# An argument longer than this (a remote script's text) is shortened in the debug log.
_SHOWN = 160


def shown(argv: list[str]) -> str:
    """ARGV for the debug log: each long argument shortened to its start and its size."""
    return shlex.join(
        a if len(a) <= _SHOWN else f"{a[:60].splitlines()[0]}...({len(a)} bytes)" for a in argv
    )


@dataclass(frozen=True)
class Owned:
    """A local process of ours (a tunnel's ssh, a supervisor), proven by all three: its
    PID, its create time, and each marker as one of its arguments (or an option's value,
    `X=marker`). A process that fails any of them, or another user's, is not ours."""

    pid: int | None
    created: float | None
    markers: tuple[str, ...]

    def process(self) -> psutil.Process | None:
        """The live process, or None."""
        if self.pid is None or self.created is None or not all(self.markers):
            return None
        import psutil

        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.created) > 0.01 or p.uids().real != os.getuid():
                return None
            cmd = p.cmdline()
            if not all(any(_names(a, m) for a in cmd) for m in self.markers):
                return None
            return None if p.status() == psutil.STATUS_ZOMBIE else p
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def stop(self, grace: float = 3.0) -> bool:
        """TERM, then KILL after GRACE seconds; False if it was not running."""
        p = self.process()
        if p is None:
            return False
        terminate(p, grace)
        return True


def _names(arg: str, marker: str) -> bool:
    return arg == marker or arg.endswith("=" + marker)


def owned(pid: int) -> Owned:
    """PID (just started by us) as an Owned with its create time and no marker."""
    import psutil

    return Owned(pid, psutil.Process(pid).create_time(), ())


def terminate(p: psutil.Process, grace: float) -> None:
    """TERM, wait up to GRACE seconds, then KILL. A zombie counts as gone: it only waits
    for whoever reaps it, which for an orphan can take a while."""
    import psutil

    def gone() -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    for sig in (p.terminate, p.kill):
        try:
            sig()
        except psutil.NoSuchProcess:
            return
        except psutil.AccessDenied:  # not ours after all: never a reason to crash
            log.warning("not allowed to signal process %d; left it alone", p.pid)
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.01)


@dataclass(frozen=True)
class Completed:
    """What a finished process left behind."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: list[str],
    *,
    timeout: float,
    stdin_text: str | bytes | None = None,
    output_file: Path | None = None,
    what: str = "command",
    cwd: Path | None = None,
) -> Completed:
    """Run `argv` to completion and return its exit code and output.

    `stdin_text` is written to its stdin (how secrets travel, and the private installer's
    wheels, as bytes); otherwise stdin is /dev/null.
    With `output_file`, stdout and stderr go to that file instead of pipes: needed for
    `ssh -f`, whose background child keeps them open long after the parent has returned.
    A process still running after `timeout` seconds is killed and reported as a JlremoteError.
    """
    log.debug("run: %s", shown(argv))
    # With input=..., subprocess makes the stdin pipe itself.
    stdin = None if stdin_text is not None else subprocess.DEVNULL
    data = stdin_text.encode() if isinstance(stdin_text, str) else stdin_text
    try:
        if output_file is not None:
            with open(output_file, "ab") as out:
                proc = subprocess.run(
                    argv,
                    stdin=stdin,
                    stdout=out,
                    stderr=out,
                    timeout=timeout,
                    input=data,
                    cwd=cwd,
                )
            return Completed(argv, proc.returncode, "", "")
        proc = subprocess.run(
            argv,
            stdin=stdin,
            capture_output=True,
            timeout=timeout,
            input=data,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        raise JlremoteError(
            f"{what} did not finish within {timeout:.0f}s", ExitCode.CONNECT
        ) from None
    except FileNotFoundError:
        raise JlremoteError(f"{argv[0]}: not found", ExitCode.NO_SSH) from None
    log.debug("exit %d", proc.returncode)
    return Completed(
        argv,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


def python_argv(*args: str) -> list[str]:
    """This Python running ARGS, never importing from the working directory (a `pip/` or
    `jlremote/` folder there would run as the user): -P (Python 3.11+); callers run it in
    a private directory too, for older Pythons."""
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, *args]


def spawn_detached(
    argv: list[str], log_path: Path, cwd: Path | None = None, pass_fds: tuple[int, ...] = ()
) -> int:
    """Start `argv` in a session of its own (no terminal, immune to the terminal's hang-up
    and Ctrl-C), stdin from /dev/null, output appended to `log_path`, in the directory
    `cwd` (default: ours), with our descriptors PASS_FDS (same numbers); returns its PID."""
    log.debug("spawn: %s", shown(argv))
    with open(log_path, "ab") as out:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
            pass_fds=pass_fds,
            cwd=cwd,
        )
    return child.pid


def stream(argv: list[str], clean: Callable[[str], str]) -> int:
    """Run `argv`, passing each line of its output through CLEAN to our stdout (for
    `logs -f`: the remote's text, made safe for a terminal), until it ends or the user
    presses Ctrl-C; returns its exit code (130 after Ctrl-C). Its stdin is a pipe held open
    until then: closing it tells the far end that we are gone."""
    log.debug("stream: %s", shown(argv))

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # `kill` ends it as cleanly as Ctrl-C

    # SIGINT too: a process started in the background of a non-interactive shell inherits
    # SIGINT ignored, and would then let ssh alone die of a `kill -INT`.
    previous = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    try:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    except FileNotFoundError:
        restore()
        raise JlremoteError(f"{argv[0]}: not found", ExitCode.NO_SSH) from None
    interrupted = False
    try:
        assert child.stdout is not None
        for raw in iter(child.stdout.readline, b""):
            sys.stdout.write(clean(raw.decode(errors="replace").rstrip("\n")) + "\n")
            sys.stdout.flush()
        # A Ctrl-C to the process group reaches us as it reaches ssh (our handler is in
        # place): if ssh ends first, the KeyboardInterrupt comes at the next bytecode.
        return child.wait()
    except KeyboardInterrupt:
        interrupted = True
        return 130
    finally:
        restore()
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if child.stdin is not None:
            child.stdin.close()
        if interrupted and child.stdout is not None:
            child.stdout.close()
