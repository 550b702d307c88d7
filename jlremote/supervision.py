"""The session's supervisor as the commands see it: how it is started, found, asked
what it is doing, proven to hold the session's port, and stopped. The supervisor's own
process (its loop) is jlremote.supervisor; this module is below it and below every
command, so the process and the commands share these steps without importing each other.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jlremote import guard, proc
from jlremote.paths import ensure_private_dir, state_dir
from jlremote.state import Session, StateStore

MODULE = guard.SUPERVISOR


@dataclass(frozen=True)
class SupervisorStatus:
    """What the supervisor last reported."""

    # up | reconnecting | failed | needs login (a new login would prompt: `start` asks)
    # | queued (waiting for a --no-wait job)
    state: str
    attempts: int = 0
    last_error: str | None = None
    since: float = 0.0
    detail: str = ""  # while queued: what the job is doing, as the progress line says it
    held: int = 0  # connections waiting for the tunnel (on the session's port)


def status_path(name: str) -> Path:
    return state_dir() / "supervisors" / f"{name}.json"


def read_status(name: str) -> SupervisorStatus | None:
    """The supervisor's last report, or None if there is none (or it is unreadable)."""
    try:
        data: dict[str, Any] = json.loads(status_path(name).read_text())
        return SupervisorStatus(**data)
    except (OSError, ValueError, TypeError):
        return None


WAITER_FRESH = 2.0


def _waiter_path(name: str) -> Path:
    return state_dir() / "supervisors" / f"{name}.waiting"


def someone_waits(name: str) -> None:
    """Say that a command waits, at a terminal or in a script, for NAME's queued job."""
    path = _waiter_path(name)
    ensure_private_dir(path.parent)
    path.touch()


def waited_for(name: str) -> bool:
    try:
        return time.time() - _waiter_path(name).stat().st_mtime < WAITER_FRESH
    except OSError:
        return False


def argv_for(name: str, wait: float, fd: int) -> list[str]:
    """How `start` launches the supervisor of session NAME, with the session's listening
    socket as descriptor FD. `-m` would put the caller's working directory first on the
    import path (a `jlremote/` folder there would run as the user): -P leaves it out
    (Python 3.11+), and spawn() runs it in the private state directory anyway."""
    return guard.supervisor_argv(name, wait, fd)


def spawn(name: str, listener: socket.socket, wait: float = 30.0) -> proc.Owned:
    """Start the supervisor of NAME, holding LISTENER (the session's port) from now on. It
    carries connections as soon as the tunnel's socket is there, and takes up the rest
    of its work once the session's record names it; it gives up if none does within WAIT
    seconds: so `start` can spawn it early, while the server boots."""
    fd = listener.fileno()
    pid = guard.spawn(name, argv_for(name, wait, fd), (fd,))
    started = proc.owned(pid)
    return owned(name, started.pid, started.created)


def owned(name: str, pid: int | None, created: float | None) -> proc.Owned:
    """The supervisor of NAME known as PID + CREATED: its argv names the module and NAME."""
    return proc.Owned(pid, created, (MODULE, name))


def of(session: Session) -> proc.Owned:
    """SESSION's recorded supervisor."""
    return owned(session.name, session.supervisor_pid, session.supervisor_created)


def holds_port(session: Session) -> bool:
    """Whether SESSION's local port is held by its own supervisor (or that supervisor's
    guard): a live process of ours, proven by PID, create time and argv, with a listening
    socket on 127.0.0.1:PORT. Nobody else can listen there beside it (no SO_REUSEPORT),
    so a token sent to the port goes to us. Checked before any token or browser goes
    there: a port whose holder died may have been bound by another local user."""
    import psutil

    port = session.tunnel.local_port
    for owner in (of(session), guard.read_record(session.name)):
        p = owner.process()
        if p is None:
            continue
        try:
            found = p.net_connections(kind="tcp4")
        except psutil.Error:
            continue
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr and tuple(c.laddr) == ("127.0.0.1", port)
            for c in found
        ):
            return True
    return False


def revived(store: StateStore, name: str, dead: int | None, timeout: float = 5.0) -> Session | None:
    """NAME's record once a new supervisor has taken over from DEAD (its guard starts
    one within a second or so); None when none will (no guard) or none did in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = store.read().get(name)
        if current is None:
            return None
        if current.supervisor_pid != dead and of(current).alive():
            return current
        if not guard.read_record(name).alive():
            return None
        time.sleep(0.1)
    return None


def stop(session: Session, grace: float = 3.0) -> bool:
    """Terminate SESSION's supervisor (it takes its tunnel down with it). False if none."""
    return of(session).stop(grace)
