"""The desk of a session's supervisor: all of the session's held ports (one Keeper each:
Jupyter's, and its other apps'), and a Unix socket where a command of the same user hands
over one more listening socket to hold, or asks to let one go.

The desk's socket is 0600 in the 0700 runtime directory, so only its user can connect at
all; it also checks the caller's uid where the system tells it (SO_PEERCRED on Linux,
LOCAL_PEERCRED on macOS and the BSDs; peer_uid), and relies on those modes elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

from jlremote.errors import ExitCode, JlremoteError
from jlremote.keeper import TICK, Keeper, Outage

log = logging.getLogger(__name__)

# Linux: SOL_SOCKET/SO_PEERCRED gives `struct ucred` (pid, uid, gid). macOS and the BSDs:
# SOL_LOCAL (0)/LOCAL_PEERCRED (1) gives `struct xucred` (version, uid, ...).
SO_PEERCRED = getattr(socket, "SO_PEERCRED", None)
LOCAL_PEERCRED = getattr(socket, "LOCAL_PEERCRED", 1)
SOL_LOCAL = 0


def peer_uid(conn: socket.socket, way: str | None = None) -> int | None:
    """The uid of the process at the other end of the Unix socket CONN; None where the
    system does not tell (WAY: `ucred`, `xucred` or `none`; default: this system's)."""
    way = way or ("ucred" if SO_PEERCRED is not None else "xucred")
    try:
        if way == "ucred":
            opt = SO_PEERCRED if SO_PEERCRED is not None else 17
            return int(struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, opt, 12))[1])
        if way == "xucred":
            raw = conn.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, 76)
            return int(struct.unpack_from("2I", raw)[1])
    except (OSError, struct.error):
        return None
    return None


class Ports:
    """A session's held ports: its own (Jupyter's, MAIN) and its other apps' (`--forward`),
    one Keeper each; and a Unix socket at PATH (0600 in the 0700 runtime directory) where
    a command of the same user hands over one more listening socket to hold (`hold`), or
    asks to let one go (`release`). So an app's port, too, is bound by the command that
    adds it and held from then on, never free between the two."""

    def __init__(
        self,
        main: Keeper,
        path: str,
        upstream: Callable[[int], str],
        peer_check: str | None = None,
    ) -> None:
        self.peer_check = peer_check  # how callers' uids are told (peer_uid); tests choose
        self.main = main
        self.path = path
        self.upstream = upstream  # the tunnel's socket for a port
        self.apps: dict[int, Keeper] = {}
        self._outage = Outage()
        self._lock = threading.Lock()
        self._desk: socket.socket | None = None
        # Told of each port held or let go (the guard holds a copy of each: jlremote.guard).
        self.on_hold: Callable[[str, socket.socket], None] = lambda kind, listener: None
        self.on_release: Callable[[int], None] = lambda port: None

    def sockets(self) -> list[tuple[str, socket.socket]]:
        """Every listening socket held now: ("main", Jupyter's), ("app", ...)."""
        with self._lock:
            return [("main", self.main.listener)] + [
                ("app", k.listener) for k in self.apps.values()
            ]

    def adopt(self, listener: socket.socket) -> None:
        """Hold LISTENER, an app's port, from now on (one more Keeper)."""
        port = int(listener.getsockname()[1])
        k = Keeper(listener, self.upstream(port), self.main.hold, budget=self.main.budget)
        k.outage = self._outage
        with self._lock:
            old = self.apps.pop(port, None)
            self.apps[port] = k.start()
        if old is not None:
            old.close()
        self.on_hold("app", listener)
        log.info("holding port %d", port)

    @property
    def port(self) -> int:
        return self.main.port

    @property
    def held(self) -> int:
        with self._lock:
            keepers = [self.main, *self.apps.values()]
        return sum(k.held for k in keepers)

    @property
    def outage(self) -> Outage:
        return self._outage

    @outage.setter
    def outage(self, value: Outage) -> None:
        self._outage = value
        with self._lock:
            for k in (self.main, *self.apps.values()):
                k.outage = value

    def start(self) -> Ports:
        self.main.start()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        desk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            desk.bind(self.path)
        finally:
            os.umask(old)
        desk.listen(8)
        self._desk = desk
        threading.Thread(target=self._serve, args=(desk,), name="ports", daemon=True).start()
        return self

    def close(self) -> None:
        """Let every port go."""
        if self._desk is not None:
            with contextlib.suppress(OSError):
                self._desk.shutdown(socket.SHUT_RDWR)  # (wakes its accept)
            self._desk.close()
        with self._lock:
            keepers = [self.main, *self.apps.values()]
            self.apps.clear()
        for k in keepers:
            k.close()

    def _serve(self, desk: socket.socket) -> None:
        while True:
            try:
                conn, _ = desk.accept()
            except OSError as exc:
                if self._desk is None or desk.fileno() < 0 or exc.errno == errno.EINVAL:
                    return  # closed
                log.warning("desk: %s", exc)  # (no descriptor left): try again
                time.sleep(TICK)
                continue
            with conn:
                try:
                    conn.settimeout(5)
                    answer = self._one(conn)
                except (OSError, ValueError) as exc:
                    answer = f"error: {exc}"
                with contextlib.suppress(OSError):
                    conn.sendall(answer.encode() + b"\n")

    def _one(self, conn: socket.socket) -> str:
        uid = peer_uid(conn, self.peer_check)
        if uid is not None and uid != os.getuid():
            return "error: not yours"
        msg, fds, _, _ = socket.recv_fds(conn, 256, 1)
        words = msg.decode().split()
        if len(words) != 2 or not words[1].isdigit():
            for fd in fds:
                os.close(fd)
            return "error: what?"
        op, port = words[0], int(words[1])
        if op == "hold" and len(fds) == 1:
            self.adopt(socket.socket(fileno=fds[0]))
            return "ok"
        for fd in fds:
            os.close(fd)
        if op == "release":
            with self._lock:
                gone = self.apps.pop(port, None)
            if gone is not None:
                self.on_release(port)
                gone.close()
                log.info("let port %d go", port)
            return "ok"
        return "error: what?"


def _ask(desk_path: str, message: str, fds: list[int], wait: float) -> None:
    """Send MESSAGE (and FDS) to the desk at DESK_PATH; raise unless it says ok. Waits up
    to WAIT seconds for the desk to be there (a supervisor just spawned)."""
    deadline = time.monotonic() + wait
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            s.connect(desk_path)
            socket.send_fds(s, [message.encode()], fds)
            answer = s.makefile("rb").readline().decode().strip()
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise JlremoteError(
                    "the session's supervisor does not answer: it has gone; "
                    "`jlremote start` starts it again)",
                    ExitCode.TUNNEL,
                ) from None
            time.sleep(0.05)
        finally:
            s.close()
    if answer != "ok":
        raise JlremoteError(f"the session's supervisor said: {answer}", ExitCode.TUNNEL)


def hand(desk_path: str, listener: socket.socket, wait: float = 5.0) -> None:
    """Give LISTENER to the supervisor whose desk is at DESK_PATH, to hold from now on."""
    port = int(listener.getsockname()[1])
    _ask(desk_path, f"hold {port}", [listener.fileno()], wait)


def release(desk_path: str, port: int) -> None:
    """Ask the supervisor whose desk is at DESK_PATH to let PORT go."""
    _ask(desk_path, f"release {port}", [], 0.0)
