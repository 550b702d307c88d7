"""The session's local port, held by us for as long as the session exists.

The supervisor listens on 127.0.0.1:PORT itself (the socket is bound by `start` and handed
down, so the port is never free between one owner and the next) and carries each
connection to the tunnel's own private Unix socket (0600, in the 0700 runtime directory),
which the tunnel's ssh forwards to the server. When the tunnel is down, nothing listens
on that socket: a connection is then held (accepted, its request kept) and carried
through once a new tunnel is up, or answered with a 503 page after HOLD seconds. A
request whose tunnel died before any answer came back is carried again on the next
tunnel when its method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE), as a browser
retries one on a reused connection; others get the same end as through a plain forward.

One thread, one selector, non-blocking sockets: it copies with 256 KiB reads and writes
at once what it reads, so the copy costs little next to ssh's encryption (`make bench`
measures a download through it against a plain `ssh -L`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import html
import logging
import os
import selectors
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from jlremote import loopback
from jlremote.errors import ExitCode, JlremoteError

log = logging.getLogger(__name__)

# Linux moves the server's bytes from the tunnel's socket to the client's through a pipe
# (splice): no copy through this process, about half its CPU time per byte. Elsewhere
# (macOS), recv_into one buffer and send from it.
SPLICE = hasattr(os, "splice")
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

HOLD = 120.0  # seconds a connection waits for the tunnel before it gets the 503 page
TICK = 0.1  # how often held connections look for a tunnel
CHUNK = 256 * 1024
HIGH_WATER = 1024 * 1024  # stop reading a side while this much waits for the other
REPLAY_LIMIT = 256 * 1024  # a request longer than this is not carried a second time
REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
MAX_CONNECTIONS = 512  # at most, on all of a process's ports (see Budget)
FDS_PER_CONNECTION = 4  # the client, the tunnel's socket, a splice pipe's two ends
FD_RESERVE = 64  # for the state file, ssh's pipes, the desk, a new tunnel
RETRIES = 3  # a request the server itself closes unanswered is not tried forever
LINGER = 2.0  # after the 503 page: how long the client may take to close


def hold_seconds() -> float:
    """HOLD, or $JLREMOTE_HOLD_SECONDS (tests shorten it)."""
    try:
        return max(1.0, float(os.environ.get("JLREMOTE_HOLD_SECONDS", "")))
    except ValueError:
        return HOLD


def listen(port: int, address: str = loopback.JUPYTER) -> socket.socket:
    """A listening socket on ADDRESS:PORT (0: any free port; ADDRESS a loopback one).
    SO_REUSEADDR only, as ssh binds: the connections of a previous owner in TIME_WAIT do
    not keep the port from us; no SO_REUSEPORT, so no one (of any user) can listen on it
    beside us."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        s.listen(128)
    except OSError as exc:
        s.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            said = f"local port {port} is already in use"
            raise JlremoteError(said, ExitCode.LOCAL_PORT) from None
        raise
    return s


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (the usual soft
    limit, 1,024 on Linux and 256 on macOS, is what another local user's idle connections
    would exhaust first); returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (hard, 10240):  # (macOS refuses an unlimited hard limit above OPEN_MAX)
        if want == resource.RLIM_INFINITY or want > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                return int(want) if want != resource.RLIM_INFINITY else 1 << 20
            except (ValueError, OSError):
                continue
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


class Budget:
    """How many connections all the Keepers of one process may have at once: well below
    the open-file limit, so that a flood of connections (another local user's, say) is
    answered with the 503 page or closed, and never makes an accept, a link or a read of
    the state file fail. Connections of other users (where the system tells: Linux) may
    take half of it at most: the other half stays the user's own, so a flood slows
    nothing of theirs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self.foreign = 0
        self._lock = threading.Lock()

    @classmethod
    def for_fd_limit(cls, soft: int) -> Budget:
        return cls(max(8, min(MAX_CONNECTIONS, (soft - FD_RESERVE) // FDS_PER_CONNECTION)))

    def take(self, foreign: bool = False) -> bool:
        with self._lock:
            if self.taken >= self.limit or (foreign and self.foreign >= self.limit // 2):
                return False
            self.taken += 1
            self.foreign += foreign
            return True

    def give(self, foreign: bool = False) -> None:
        with self._lock:
            self.taken -= 1
            self.foreign -= foreign


def peer_uids(path: str = "/proc/net/tcp") -> dict[tuple[str, int, int], int] | None:
    """Who holds the far end of each loopback TCP connection here: (its address, its
    port, the port it connects to) to its uid. None where the system does not tell
    (not Linux): then every connection counts as the user's own."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    owners: dict[tuple[str, int, int], int] = {}
    for line in lines:
        words = line.split()
        try:
            local, remote, uid = words[1], words[2], int(words[7])
            laddr, lport = local.split(":")
            _, rport = remote.split(":")
            addr = socket.inet_ntoa(struct.pack("=I", int(laddr, 16)))
            owners[(addr, int(lport, 16), int(rport, 16))] = uid
        except (IndexError, ValueError, struct.error):
            continue
    return owners


@dataclass(frozen=True)
class Outage:
    """What the 503 page says: the tunnel's state (`connecting`, `reconnecting`, `needs
    login`, `failed`), the attempt, ssh's last error."""

    host: str = ""
    state: str = "connecting"
    attempts: int = 0
    last_error: str = ""
    name: str = ""

    @property
    def final(self) -> bool:
        """Waiting cannot help: the user must act (answered at once)."""
        return self.state in ("needs login", "failed")

    def page(self, busy: bool = False) -> bytes:
        """The 503 answer, whole (BUSY: too many connections now, whatever the tunnel)."""
        where = f" to {self.host}" if self.host else ""
        again = f"`jlremote start {self.host or self.name}`"
        error = self.last_error or "?"
        if busy:
            words = "jlremote: too many connections to this port now; try again shortly"
        elif self.state == "needs login":
            words = f"jlremote: the tunnel{where} needs a new login ({error}); run {again}"
            words += " to log in again"
        elif self.state == "failed":
            words = f"jlremote: the tunnel{where} gave up after {self.attempts} attempt(s): "
            words += f"{error}; {again} tries again"
        else:
            words = f"jlremote: {self.state}{where}"
            if self.attempts:
                words += f", attempt {self.attempts}"
            if self.last_error:
                words += f", last error: {self.last_error}"
        body = (
            "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=5>"
            f"<title>jlremote: {html.escape(self.state)}</title>"
            f"<p>{html.escape(words)}</p>\n"
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: text/html; charset=utf-8\r\n"
            "Cache-Control: no-store\r\n"
            "Retry-After: 5\r\n"
            "Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        return head + body


HELD, LINKED, ANSWERING = "held", "linked", "answering"


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    since: float
    foreign: bool = False  # another user's (its place is taken from their half)
    mode: str = HELD
    up: socket.socket | None = None
    to_up: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    # What the client sent before the server's first byte came back (None once it did,
    # or when too long to carry again): sent again on the next tunnel.
    request: bytearray | None = field(default_factory=bytearray)
    client_eof: bool = False
    up_eof: bool = False
    tries: int = 0
    retry_at: float = 0.0
    # With splice: the server's bytes go through this pipe (read end, write end), and
    # PIPED of them wait there for the client.
    pipe: tuple[int, int] | None = None
    piped: int = 0
    # What the selector watches on each side now (so that it is told only of changes).
    client_mask: int = 0
    up_mask: int = 0

    @property
    def replayable(self) -> bool:
        """Whether the request may be sent again: nothing sent yet, or an idempotent one."""
        if self.request is None:
            return False
        return not self.request or bytes(self.request[:8]).split(b" ", 1)[0] in REPLAYABLE


class Keeper:
    """Holds LISTENER and carries its connections to the Unix socket UPSTREAM."""

    def __init__(
        self,
        listener: socket.socket,
        upstream: str,
        hold: float | None = None,
        splice: bool = SPLICE,
        budget: Budget | None = None,
    ):
        self.listener = listener
        self.budget = budget or Budget(MAX_CONNECTIONS)
        self.check_peers = sys.platform.startswith("linux")  # (who holds each far end)
        self._paused = False  # not accepting for a tick (no descriptor left)
        self.upstream = upstream
        self.hold = hold_seconds() if hold is None else hold
        self.splice = splice  # the server's bytes to the client without a copy through us
        self.outage = Outage()  # set by the supervisor; read by this thread
        self._sel = selectors.DefaultSelector()
        self._buf = bytearray(CHUNK)  # every read lands here (one thread)
        self._view = memoryview(self._buf)
        self._conns: set[_Conn] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    @property
    def held(self) -> int:
        """Connections waiting for a tunnel now."""
        return sum(1 for c in list(self._conns) if c.mode == HELD)

    def start(self) -> Keeper:
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout=2)

    def close(self) -> None:
        """Stop, and let the port go (its connections end)."""
        self.stop()
        self.listener.close()

    # ---- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        last_tick = 0.0
        while not self._stopping:
            try:  # nothing a connection does, and no lack of descriptors, ends the loop
                last_tick = self._round(last_tick)
            except Exception:
                log.exception("keeper")
                time.sleep(TICK)
        for conn in list(self._conns):
            self._close(conn)

    def _round(self, last_tick: float) -> float:
        for key, events in self._sel.select(timeout=TICK):
            if key.data is None:
                self._accept()
                continue
            conn, side = key.data
            if conn not in self._conns:
                continue
            try:
                self._ready(conn, side, events)
            except OSError as exc:
                self._failed(conn, side, exc)
            except Exception:  # a bug: that connection ends, the port stays served
                log.exception("connection on %s", side)
                self._close(conn)
        now = time.monotonic()
        if now - last_tick >= TICK:
            last_tick = now
            if self._paused:  # accept again (what waited meanwhile is in the backlog)
                self._paused = False
                _register(self._sel, self.listener, selectors.EVENT_READ, None)
            try:
                self._tick(now)
            except Exception:
                log.exception("tick")
        return last_tick

    def _accept(self) -> None:
        accepted: list[tuple[socket.socket, tuple[str, int]]] = []
        while len(accepted) < 256:
            try:
                accepted.append(self.listener.accept())
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE and the like: not before the next tick
                log.warning("accept: %s", exc)
                self._paused = True
                _register(self._sel, self.listener, 0, None)
                break
        if not accepted:
            return
        owners = peer_uids() if self.check_peers else None  # (once for all of them)
        me = os.getuid()
        for client, peer in accepted:
            foreign = owners is not None and owners.get((*peer, self.port)) != me
            if not self.budget.take(foreign):
                _refuse(client, self.outage)
                continue
            client.setblocking(False)
            conn = _Conn(client, time.monotonic(), foreign=foreign)
            self._conns.add(conn)
            self._link(conn)
            self._interest(conn)

    def _tick(self, now: float) -> None:
        outage = self.outage
        for conn in list(self._conns):
            if conn.mode == ANSWERING and now - conn.since > LINGER:
                self._close(conn)
            if conn.mode != HELD or now < conn.retry_at:
                continue
            if self._link(conn):
                self._interest(conn)
            elif outage.final or now - conn.since >= self.hold:
                self._answer(conn)

    def _link(self, conn: _Conn) -> bool:
        """Carry CONN through the tunnel's socket, if a tunnel listens there now."""
        try:
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # no descriptor left: held, tried again next tick
            log.warning("link: %s", exc)
            return False
        up.setblocking(False)
        try:
            up.connect(self.upstream)
        except OSError:  # no tunnel now (no socket, nobody listening, its backlog full)
            up.close()
            return False
        conn.up, conn.up_eof, conn.mode = up, False, LINKED
        if conn.request is not None:
            conn.to_up = bytearray(conn.request)  # what it sent while held, or again
        return True

    def _unlink(self, conn: _Conn) -> None:
        """The tunnel died before the server answered: hold CONN for the next one."""
        self._drop_up(conn)
        conn.mode, conn.to_up = HELD, bytearray()
        conn.tries += 1
        conn.retry_at = time.monotonic() + min(1.0, 0.1 * 2**conn.tries)
        log.info("a request lost its tunnel before an answer; held for the next one")

    # ---- data ----------------------------------------------------------------------------

    def _ready(self, conn: _Conn, side: str, events: int) -> None:
        if events & selectors.EVENT_READ:
            if side == "client":
                self._read_client(conn)
            else:
                self._read_up(conn)
        if conn in self._conns and events & selectors.EVENT_WRITE:
            self._flush(conn)
        if conn in self._conns:
            self._interest(conn)

    def _read_client(self, conn: _Conn) -> None:
        n = conn.client.recv_into(self._buf)
        data = self._view[:n]
        if not n:
            conn.client_eof = True
            if conn.mode != LINKED:
                self._close(conn)  # it gave up waiting (or after our page)
                return
            self._flush(conn)
            return
        if conn.mode == ANSWERING:
            return  # what it still sends after the page is not read by anyone
        if conn.request is not None:
            if conn.mode == HELD or len(conn.request) + len(data) <= REPLAY_LIMIT:
                conn.request += data  # (while held, all of it: it goes up at the link)
            else:
                conn.request = None
        if conn.mode == LINKED:
            _forward(data, conn.up, conn.to_up)

    def _read_up(self, conn: _Conn) -> None:
        assert conn.up is not None
        if self.splice:
            if conn.pipe is None:
                conn.pipe = _pipe()
            up, (r, w), client = conn.up.fileno(), conn.pipe, conn.client.fileno()
            moved, ended = 0, False
            # While the server sends and the client takes, go on without waiting for the
            # selector between chunks (ssh writes a channel's data some 32 KiB at a time):
            # two system calls per chunk, and little of Python.
            while not conn.piped:
                try:
                    n = os.splice(up, w, CHUNK, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    break
                if not n:
                    ended = True
                    break
                moved += n
                try:
                    out = os.splice(r, client, n, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    out = 0
                conn.piped = n - out
            if moved:
                conn.request = None
            if not ended:
                return  # (what waits in the pipe goes on once the client can take it)
            n = 0
        else:
            n = conn.up.recv_into(self._buf)
        if not n:
            if conn.replayable and conn.tries < RETRIES:
                self._unlink(conn)
                return
            conn.up_eof = True
            self._flush(conn)
            return
        conn.request = None
        _forward(self._view[:n], conn.client, conn.to_client)

    def _flush(self, conn: _Conn) -> None:
        """Write what waits on either side; pass each end-of-stream on once drained."""
        if conn.to_client:
            sent = _send(conn.client, conn.to_client)
            del conn.to_client[:sent]
        if conn.piped and conn.pipe is not None:
            with contextlib.suppress(BlockingIOError):
                fd = conn.client.fileno()
                conn.piped -= os.splice(conn.pipe[0], fd, conn.piped, flags=SPLICE_FLAGS)
        if conn.up is not None and conn.to_up:
            sent = _send(conn.up, conn.to_up)
            del conn.to_up[:sent]
        if conn.mode == ANSWERING:
            if not conn.to_client:
                with contextlib.suppress(OSError):
                    conn.client.shutdown(socket.SHUT_WR)
            return
        if conn.mode != LINKED:
            return
        drained = not conn.to_client and not conn.piped
        if conn.up_eof and drained:
            with contextlib.suppress(OSError):
                conn.client.shutdown(socket.SHUT_WR)
        if conn.client_eof and not conn.to_up and conn.up is not None:
            with contextlib.suppress(OSError):
                conn.up.shutdown(socket.SHUT_WR)
        if conn.up_eof and conn.client_eof and drained and not conn.to_up:
            self._close(conn)

    def _failed(self, conn: _Conn, side: str, exc: OSError) -> None:
        if side == "up" and conn.replayable and conn.tries < RETRIES:
            self._unlink(conn)
            self._interest(conn)
            return
        log.debug("connection closed on %s: %s", side, exc)
        self._close(conn)

    def _interest(self, conn: _Conn) -> None:
        """Register what each side of CONN waits for now (back-pressure included)."""
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        if conn.client_eof:
            room = False
        elif conn.mode == LINKED:
            room = len(conn.to_up) < HIGH_WATER
        elif conn.mode == HELD:
            room = len(conn.request or b"") < REPLAY_LIMIT
        else:
            room = True
        want = (read if room else 0) | (write if conn.to_client or conn.piped else 0)
        if want != conn.client_mask:
            _register(self._sel, conn.client, want, (conn, "client"))
            conn.client_mask = want
        if conn.up is not None:
            more = not conn.up_eof and len(conn.to_client) < HIGH_WATER and not conn.piped
            want = (read if more else 0) | (write if conn.to_up else 0)
            if want != conn.up_mask:
                _register(self._sel, conn.up, want, (conn, "up"))
                conn.up_mask = want

    # ---- endings -------------------------------------------------------------------------

    def _answer(self, conn: _Conn) -> None:
        """The 503 page (the tunnel did not come back in time, or cannot by itself)."""
        self._drop_up(conn)
        conn.mode, conn.since = ANSWERING, time.monotonic()
        conn.to_client = bytearray(self.outage.page())
        with contextlib.suppress(OSError):
            self._flush(conn)
        if conn in self._conns:
            self._interest(conn)

    def _drop_up(self, conn: _Conn) -> None:
        if conn.up is not None:
            _register(self._sel, conn.up, 0, None)
            conn.up.close()
            conn.up, conn.up_mask = None, 0

    def _close(self, conn: _Conn) -> None:
        self._drop_up(conn)
        _register(self._sel, conn.client, 0, None)
        conn.client_mask = 0
        conn.client.close()
        if conn.pipe is not None:
            for fd in conn.pipe:
                os.close(fd)
            conn.pipe = None
        if conn in self._conns:
            self._conns.discard(conn)
            self.budget.give(conn.foreign)


def _refuse(client: socket.socket, outage: Outage) -> None:
    """A connection past the budget: the 503 page if it fits in the socket now, closed."""
    with contextlib.suppress(OSError):
        client.setblocking(False)
        client.send(outage.page(busy=True))
        client.shutdown(socket.SHUT_WR)
    client.close()


def _pipe() -> tuple[int, int]:
    """A pipe for splice, as big as one read where the system lets us."""
    r, w = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
    return r, w


def _forward(data: memoryview, to: socket.socket | None, pending: bytearray) -> None:
    """DATA to TO: at once, unless something waits before it; what TO cannot take now is
    kept in PENDING (sent when it is writable)."""
    if pending or to is None:
        pending += data
        return
    sent = _send(to, data)
    if sent < len(data):
        pending += data[sent:]


def _send(sock: socket.socket, buf: bytearray | memoryview) -> int:
    try:
        return sock.send(buf)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise


def _register(sel: selectors.BaseSelector, sock: socket.socket, want: int, data: object) -> None:
    """Make SEL watch SOCK for WANT (0: not at all)."""
    try:
        key = sel.get_key(sock)
    except (KeyError, ValueError):
        key = None
    if want == 0:
        if key is not None:
            sel.unregister(sock)
        return
    if key is None:
        sel.register(sock, want, data)
    elif key.events != want:
        sel.modify(sock, want, data)
