"""The one place where jlremote starts processes.

Every argv is a list (never a shell string) and is logged at debug level. Nothing secret is
ever put in an argv, so logging it is safe; stdin and stdout are never logged.
"""

from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jlremote.errors import ExitCode, JlremoteError

log = logging.getLogger(__name__)


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
    stdin_text: str | None = None,
    output_file: Path | None = None,
    what: str = "command",
) -> Completed:
    """Run `argv` to completion and return its exit code and output.

    `stdin_text` is written to its stdin (how secrets travel); otherwise stdin is /dev/null.
    With `output_file`, stdout and stderr go to that file instead of pipes: needed for
    `ssh -f`, whose background child keeps them open long after the parent has returned.
    A process still running after `timeout` seconds is killed and reported as a JlremoteError.
    """
    log.debug("run: %s", shlex.join(argv))
    # With input=..., subprocess makes the stdin pipe itself.
    stdin = None if stdin_text is not None else subprocess.DEVNULL
    try:
        if output_file is not None:
            with open(output_file, "ab") as out:
                proc = subprocess.run(
                    argv,
                    stdin=stdin,
                    stdout=out,
                    stderr=out,
                    timeout=timeout,
                    input=None if stdin_text is None else stdin_text.encode(),
                )
            return Completed(argv, proc.returncode, "", "")
        proc = subprocess.run(
            argv,
            stdin=stdin,
            capture_output=True,
            timeout=timeout,
            input=None if stdin_text is None else stdin_text.encode(),
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


def spawn_detached(argv: list[str], log_path: Path, cwd: Path | None = None) -> int:
    """Start `argv` in a session of its own (no terminal, immune to the terminal's hang-up
    and Ctrl-C), stdin from /dev/null, output appended to `log_path`, in the directory
    `cwd` (default: ours); returns its PID."""
    log.debug("spawn: %s", shlex.join(argv))
    with open(log_path, "ab") as out:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
            cwd=cwd,
        )
    return child.pid


def stream(argv: list[str], clean: Callable[[str], str]) -> int:
    """Run `argv`, passing each line of its output through CLEAN to our stdout (for
    `logs -f`: the remote's text, made safe for a terminal), until it ends or the user
    presses Ctrl-C; returns its exit code (130 after Ctrl-C). Its stdin is a pipe held open
    until then: closing it tells the far end that we are gone."""
    log.debug("stream: %s", shlex.join(argv))

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
