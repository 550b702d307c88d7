"""The session's second holder of its ports: the port outlives any one process of ours.

The supervisor (jlremote.supervisor) holds the session's listening sockets and serves
them. Should it die (a bug, the OOM killer, a user's `pkill -9 python`), its ports would
be free at once, and another local user could bind one and receive what the page sends.
So each supervisor has a guard: a small process that holds a copy of every one of those
sockets (the kernel keeps a port bound while any process has it open; the connections
that come meanwhile wait in its backlog) and does nothing else with them.

The two watch each other through a socket pair: one end each, so either sees the other's
death at once as the end of its stream, on every platform. A guard whose supervisor died
without saying `bye` starts a new one, handing down the sockets; that supervisor takes
over the session's record from the dead one and serves the same ports. A supervisor
whose guard died starts a new guard. `bye` (the session was stopped: the supervisor got
SIGTERM, or found its session gone) ends the guard, and the ports go.

What goes over the pair, supervisor to guard, one line each (with its socket, for
`main` and `app`): `main PORT`, `app PORT`, `release PORT`, `bye`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from jlremote import proc
from jlremote.paths import ensure_private_dir, state_dir
from jlremote.state import StateStore

log = logging.getLogger("jlremote.guard")

MODULE = "jlremote.guard"
SUPERVISOR = "jlremote.supervisor"
# A supervisor that dies again sooner than this after its start is started again later
# (a bug that kills it at once must not become a loop of processes).
STEADY = 30.0
RESPAWN_FIRST, RESPAWN_CAP = 0.2, 10.0


def supervisor_argv(name: str, wait: float, fd: int, *extra: str) -> list[str]:
    """`python -P -m jlremote.supervisor NAME WAIT FD [after=PID link=FD apps=FD,...]`."""
    return proc.python_argv("-m", SUPERVISOR, name, f"{wait:g}", str(fd), *extra)


def spawn(name: str, argv: list[str], fds: tuple[int, ...]) -> int:
    """Start ARGV (a supervisor or a guard of session NAME) detached, in the private state
    directory, logging to the session's supervisor log, with our descriptors FDS."""
    return proc.spawn_detached(
        argv,
        ensure_private_dir(state_dir() / "logs") / f"{name}.supervisor.log",
        cwd=ensure_private_dir(state_dir()),
        pass_fds=fds,
    )


def record_path(name: str) -> Path:
    """Where a supervisor writes its guard's PID and create time (for `status`, `open`:
    the guard, too, proves a port is the session's)."""
    return state_dir() / "supervisors" / f"{name}.guard"


def read_record(name: str) -> proc.Owned:
    """Session NAME's guard, as its supervisor last recorded it."""
    try:
        pid, created = record_path(name).read_text().split()
        return owned(name, int(pid), float(created))
    except (OSError, ValueError):
        return owned(name, None, None)


def owned(name: str, pid: int | None, created: float | None) -> proc.Owned:
    return proc.Owned(pid, created, (MODULE, name))


def set_process_name(name: str) -> None:
    """On Linux, the process's name (what `ps -e`, `top` and `pkill python` match) says
    what it is: a user's `pkill -9 python` must not take both holders of a port at once."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


# ---- the supervisor's side -------------------------------------------------------------


class Link:
    """The supervisor's end: spawns a guard (or adopts the one that started this
    supervisor), tells it every socket to hold, and starts a new guard if it dies."""

    def __init__(self, name: str, sockets: Callable[[], list[tuple[str, socket.socket]]]) -> None:
        self.name = name
        self.sockets = sockets  # ("main" | "app", listening socket), all of them now
        self._end: socket.socket | None = None
        # Re-entrant: bye() may come from the SIGTERM handler while this thread sends.
        self._lock = threading.RLock()
        self._closing = False
        self._child: proc.Owned | None = None

    def start(self, adopted: socket.socket | None = None) -> Link:
        """With ADOPTED (our end of the pair of the guard that started us), keep that
        guard; else spawn one."""
        if adopted is not None:
            self._end = adopted
            self._send_all()
            self._record(os.getppid())
        else:
            self._spawn()
        threading.Thread(target=self._watch, name="guard-link", daemon=True).start()
        return self

    def hold(self, kind: str, listener: socket.socket) -> None:
        port = int(listener.getsockname()[1])
        self._send(f"{kind} {port}", [listener.fileno()])

    def release(self, port: int) -> None:
        self._send(f"release {port}", [])

    def bye(self) -> None:
        """The session is over: the guard lets the ports go, and starts nobody."""
        self._closing = True
        self._send("bye", [])

    def _send(self, line: str, fds: list[int]) -> None:
        with self._lock:
            if self._end is None:
                return
            try:
                socket.send_fds(self._end, [(line + "\n").encode()], fds)
            except OSError as exc:  # a dead guard: _watch starts a new one
                log.info("guard: %s", exc)

    def _send_all(self) -> None:
        for kind, listener in self.sockets():
            self.hold(kind, listener)

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                old, self._end = self._end, ours
            if old is not None:
                old.close()
            argv = proc.python_argv("-m", MODULE, self.name, str(theirs.fileno()), str(os.getpid()))
            pid = spawn(self.name, argv, (theirs.fileno(),))
        finally:
            theirs.close()
        self._send_all()
        self._record(pid)

    def _record(self, pid: int) -> None:
        with contextlib.suppress(Exception):
            created = proc.owned(pid).created
            path = record_path(self.name)
            ensure_private_dir(path.parent)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{pid} {created!r}\n")
            tmp.replace(path)

    def _watch(self) -> None:
        delay = RESPAWN_FIRST
        while not self._closing:
            end = self._end
            try:
                gone = end is None or not end.recv(64)
            except OSError:
                gone = True
            if self._closing:
                return
            if not gone:
                continue
            log.warning("the guard of session %s is gone; starting a new one", self.name)
            time.sleep(delay)
            delay = min(RESPAWN_CAP, delay * 2)
            try:
                self._spawn()
            except Exception:
                log.exception("guard")


# ---- the guard itself -------------------------------------------------------------------


class Guard:
    """Holds a supervisor's sockets; starts a new supervisor when it dies."""

    def __init__(self, name: str, end: socket.socket, supervisor_pid: int) -> None:
        self.name = name
        self.end = end
        self.supervisor_pid = supervisor_pid
        self.main: socket.socket | None = None
        self.apps: dict[int, socket.socket] = {}

    def run(self) -> int:
        delay = RESPAWN_FIRST
        while True:
            started = time.monotonic()
            if self._listen():
                return 0  # bye
            if self.main is None or not self._session_is_ours():
                log.info("session %s is over; letting its ports go", self.name)
                return 0
            if time.monotonic() - started > STEADY:
                delay = RESPAWN_FIRST
            log.warning(
                "the supervisor of session %s (pid %d) died; starting a new one",
                self.name,
                self.supervisor_pid,
            )
            time.sleep(delay)
            delay = min(RESPAWN_CAP, delay * 2)  # (should it die again at once)
            if not self._session_is_ours():
                return 0
            self._respawn()

    def _listen(self) -> bool:
        """Take what the supervisor says until its end closes; True on `bye`."""
        buf = b""
        pending: list[int] = []
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.end, 4096, 16)
            except OSError:
                data, fds = b"", []
            pending += fds
            if not data:
                for fd in pending:
                    os.close(fd)
                return False
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode(errors="replace").split()
                if words == ["bye"]:
                    return True
                if len(words) != 2 or not words[1].isdigit():
                    continue
                op, port = words[0], int(words[1])
                if op in ("main", "app") and pending:
                    sock = socket.socket(fileno=pending.pop(0))
                    if op == "main":
                        if self.main is not None:
                            self.main.close()
                        self.main = sock
                    else:
                        old = self.apps.pop(port, None)
                        if old is not None:
                            old.close()
                        self.apps[port] = sock
                elif op == "release":
                    gone = self.apps.pop(port, None)
                    if gone is not None:
                        gone.close()

    def _session_is_ours(self) -> bool:
        """The record still names the supervisor that died (not stopped, not replaced)."""
        try:
            session = StateStore(state_dir()).read().get(self.name)
        except Exception:  # unreadable now: keep the ports, and try again
            log.exception("state")
            return True
        return session is not None and session.supervisor_pid == self.supervisor_pid

    def _respawn(self) -> None:
        assert self.main is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [self.main.fileno(), *(s.fileno() for s in self.apps.values())]
        extra = [f"after={self.supervisor_pid}", f"link={theirs.fileno()}"]
        if self.apps:
            extra.append("apps=" + ",".join(str(s.fileno()) for s in self.apps.values()))
        argv = supervisor_argv(self.name, 30, self.main.fileno(), *extra)
        try:
            pid = spawn(self.name, argv, (*fds, theirs.fileno()))
        finally:
            theirs.close()
        self.end.close()
        # Our copies stay until it sends its own (`main`, `app`: each replaces ours), so
        # the ports are held even should it fail to start.
        self.end, self.supervisor_pid = ours, pid


def main() -> None:
    set_process_name("jlremote-guard")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s guard: %(message)s")
    name, fd, supervisor_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    end = socket.socket(fileno=fd)
    sys.exit(Guard(name, end, supervisor_pid).run())


if __name__ == "__main__":
    main()
