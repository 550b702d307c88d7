"""The port keeper (jlremote.keeper) with real sockets: a listener of its own on loopback,
and as "the tunnel" a small HTTP server on a Unix socket that comes and goes."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from jlremote import desk, keeper
from jlremote.errors import ExitCode, JlremoteError
from tests.harness.testbed import wait_until


class Upstream:
    """What the tunnel's socket leads to: answers each request with its own first line
    (or, with SILENT, closes every connection unanswered, as a tunnel that dies does)."""

    def __init__(self, path: str, silent: bool = False) -> None:
        self.path, self.silent, self.seen = path, silent, 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    got = conn.recv(65536)
                    if not got:
                        break
                    data += got
                self.seen += 1
                if self.silent:
                    continue
                line = data.split(b"\r\n", 1)[0]
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))

    def close(self) -> None:
        self.sock.close()
        Path(self.path).unlink()


@pytest.fixture
def sock_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="jlr-k-") as d:
        yield str(Path(d) / "port-sock")


@pytest.fixture(params=[True, False], ids=["splice", "copy"])
def keep(sock_path: str, request: pytest.FixtureRequest) -> Iterator[keeper.Keeper]:
    """A keeper that moves the server's bytes with splice (Linux), or copies them (the
    way it does where there is no splice, e.g. on macOS)."""
    if request.param and not keeper.SPLICE:
        pytest.skip("no splice here")
    k = keeper.Keeper(keeper.listen(0), sock_path, hold=3.0, splice=request.param).start()
    k.outage = keeper.Outage("gpubox", "reconnecting", 2, "Connection timed out", "gpubox")
    yield k
    k.stop()
    k.listener.close()


class Client(threading.Thread):
    def __init__(self, port: int, request: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.request, self.answer, self.at = port, request, b"", 0.0
        self.start()

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=20) as s:
            s.sendall(self.request)
            while chunk := s.recv(65536):
                self.answer += chunk
        self.at = time.monotonic()


GET = b"GET /api/status HTTP/1.0\r\nHost: x\r\n\r\n"
POST = b"POST /api/kernels HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def test_a_request_waits_for_the_tunnel_and_goes_through(
    keep: keeper.Keeper, sock_path: str
) -> None:
    c = Client(keep.port, GET)
    wait_until(lambda: keep.held == 1, 5, "the request to be held")
    time.sleep(0.3)
    assert c.is_alive()  # held: neither refused nor answered
    up = Upstream(sock_path)
    try:
        c.join(5)
        assert c.answer.endswith(b"GET /api/status HTTP/1.0")
        assert keep.held == 0
    finally:
        up.close()


def test_past_the_bound_the_page_says_why(keep: keeper.Keeper) -> None:
    t0 = time.monotonic()
    c = Client(keep.port, GET)
    c.join(10)
    assert c.at - t0 >= 3.0
    head, _, body = c.answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Retry-After: 5" in head and b"Connection: close" in head
    assert (
        b"<p>jlremote: reconnecting to gpubox, attempt 2, last error: Connection timed out</p>"
        in body
    )


def test_a_login_only_the_user_can_give_is_said_at_once(keep: keeper.Keeper) -> None:
    keep.outage = keeper.Outage("gpubox", "needs login", 1, "Permission denied", "gpubox")
    c = Client(keep.port, GET)
    c.join(2)
    assert (
        b"jlremote: the tunnel to gpubox needs a new login (Permission denied); "
        b"run `jlremote start gpubox` to log in again" in c.answer
    )


def test_an_idempotent_request_whose_tunnel_dies_unanswered_is_carried_again(
    keep: keeper.Keeper, sock_path: str
) -> None:
    dying = Upstream(sock_path, silent=True)
    c = Client(keep.port, GET)
    wait_until(lambda: dying.seen >= 1, 5, "the dying tunnel to take the request")
    dying.close()
    up = Upstream(sock_path)
    try:
        c.join(5)
        assert c.answer.endswith(b"GET /api/status HTTP/1.0")
    finally:
        up.close()


def test_a_post_whose_tunnel_dies_unanswered_is_not_sent_twice(
    keep: keeper.Keeper, sock_path: str
) -> None:
    dying = Upstream(sock_path, silent=True)
    try:
        c = Client(keep.port, POST)
        c.join(5)
        assert c.answer == b""  # closed, as a plain forward would
        assert dying.seen == 1
    finally:
        dying.close()


def test_a_big_download_arrives_whole(keep: keeper.Keeper, sock_path: str) -> None:
    size = 64 * 1024 * 1024
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            block = b"x" * (1024 * 1024)
            for _ in range(size // len(block)):
                conn.sendall(block)

    threading.Thread(target=serve, daemon=True).start()
    try:
        total = 0
        with socket.create_connection(("127.0.0.1", keep.port), timeout=20) as s:
            s.sendall(GET)
            while chunk := s.recv(1 << 20):
                total += len(chunk)
        assert total == size + len(b"HTTP/1.0 200 OK\r\n\r\n")
    finally:
        srv.close()


def test_the_port_cannot_be_taken_beside_it(keep: keeper.Keeper) -> None:
    for opt in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, opt, 1)
            with pytest.raises(OSError):
                s.bind(("127.0.0.1", keep.port))
                s.listen(1)


def test_a_busy_port_is_said_clearly(keep: keeper.Keeper) -> None:
    with pytest.raises(JlremoteError) as err:
        keeper.listen(keep.port)
    assert err.value.code == ExitCode.LOCAL_PORT
    assert f"local port {keep.port} is already in use" in err.value.message


def test_hold_seconds_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JLREMOTE_HOLD_SECONDS", "2.5")
    assert keeper.hold_seconds() == 2.5
    monkeypatch.setenv("JLREMOTE_HOLD_SECONDS", "soon")
    assert keeper.hold_seconds() == keeper.HOLD
    with contextlib.suppress(Exception):
        monkeypatch.delenv("JLREMOTE_HOLD_SECONDS")
    assert keeper.hold_seconds() == keeper.HOLD


@pytest.mark.parametrize("way", ["ucred", "none"])
def test_a_port_handed_over_is_held_until_let_go(sock_path: str, way: str) -> None:
    """With the caller's uid checked (Linux), and as where the system cannot tell it
    (then the desk's 0600 socket in its 0700 directory is the check)."""
    at = str(Path(sock_path).parent / "desk")
    main = keeper.Keeper(keeper.listen(0), sock_path)
    ports = desk.Ports(main, at, lambda port: f"{sock_path}-{port}", peer_check=way).start()
    try:
        _hand_and_release(ports, at, sock_path)
    finally:
        ports.close()


def _hand_and_release(ports: desk.Ports, at: str, sock_path: str) -> None:
    with keeper.listen(0) as app:
        port = int(app.getsockname()[1])
        desk.hand(at, app)
    # Ours alone closed: the supervisor's copy holds it.
    with pytest.raises(JlremoteError):
        keeper.listen(port).close()
    c = Client(port, GET)
    wait_until(lambda: ports.held == 1, 5, "the app's request to be held")
    up = Upstream(f"{sock_path}-{port}")
    try:
        c.join(5)
        assert c.answer.endswith(b"GET /api/status HTTP/1.0")
    finally:
        up.close()
    desk.release(at, port)
    keeper.listen(port).close()  # free again
    with pytest.raises(JlremoteError) as err:
        desk.release(at + "-nobody", port)
    assert "supervisor does not answer" in err.value.message


def test_status_says_how_many_connections_wait() -> None:
    from jlremote import render
    from jlremote.results import StatusRow

    row = StatusRow("gpu", "gpu", "http://127.0.0.1:1/lab", "running", "reconnecting", 1, 0, 7, 0)
    assert render._tunnel(row) == "reconnecting"
    row = replace(row, tunnel_attempts=3, held=2)
    assert render._tunnel(row) == "reconnecting (3), 2 held"
    assert row.to_json()["held"] == 2


def test_connections_past_the_budget_get_the_busy_page_and_the_port_stays_served(
    sock_path: str,
) -> None:
    up = Upstream(sock_path)
    k = keeper.Keeper(keeper.listen(0), sock_path, hold=3.0, budget=keeper.Budget(4)).start()
    idle = []
    try:
        for _ in range(4):  # linked, and silent: each holds a place
            s = socket.create_connection(("127.0.0.1", k.port), timeout=5)
            idle.append(s)
        wait_until(lambda: k.budget.taken == 4, 5, "four connections to be taken")
        c = Client(k.port, GET)
        c.join(5)
        assert c.answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"too many connections to this port now" in c.answer
        for s in idle:  # (the upstream serves one at a time: all of them go)
            s.close()
        idle.clear()
        wait_until(lambda: k.budget.taken == 0, 5, "their places to be given back")
        c = Client(k.port, GET)
        c.join(5)
        assert c.answer.endswith(b"GET /api/status HTTP/1.0")
    finally:
        for s in idle:
            s.close()
        k.close()
        up.close()


def test_a_budget_stays_well_below_the_open_file_limit() -> None:
    assert keeper.Budget.for_fd_limit(1024).limit == (1024 - 64) // 4
    assert keeper.Budget.for_fd_limit(256).limit == 48
    assert keeper.Budget.for_fd_limit(1 << 20).limit == keeper.MAX_CONNECTIONS
    assert keeper.Budget.for_fd_limit(10).limit == 8


# A keeper in a process of its own with a soft limit of 96 open files and a budget that
# does not know it (as if the limit were lowered under it): its descriptors run out.
STARVED = r"""
import logging, resource, sys, time
logging.basicConfig()
resource.setrlimit(resource.RLIMIT_NOFILE, (96, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from jlremote import keeper
k = keeper.Keeper(keeper.listen(0), sys.argv[1], hold=30.0, budget=keeper.Budget(10000)).start()
print(k.port, flush=True)
sys.stdin.read()
"""


def test_no_descriptor_left_never_ends_the_keeper(sock_path: str) -> None:
    import subprocess
    import sys

    up = Upstream(sock_path)
    said = Path(sock_path).parent / "keeper.log"
    child = subprocess.Popen(
        [sys.executable, "-c", STARVED, sock_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=said.open("w"),
    )
    flood: list[socket.socket] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for _ in range(150):  # 2 descriptors each there, linked: more than 96
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # It ran out of descriptors (and said so), and lives.
        wait_until(lambda: "Too many open files" in said.read_text(), 10, "EMFILE")
        assert child.poll() is None
        for s in flood:
            s.close()
        flood.clear()
        c = Client(port, GET)  # served again once descriptors are back
        c.join(20)
        assert c.answer.endswith(b"GET /api/status HTTP/1.0"), c.answer
        assert child.poll() is None
    finally:
        for s in flood:
            s.close()
        child.kill()
        child.wait(10)
        up.close()


def test_the_open_file_limit_is_raised_to_the_hard_one() -> None:
    import subprocess
    import sys

    script = (
        "import resource; from jlremote import keeper\n"
        "h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, h))\n"
        "got = keeper.raise_fd_limit()\n"
        "print(got == resource.getrlimit(resource.RLIMIT_NOFILE)[0], got > 64 or h == 64)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_other_users_take_half_of_the_budget_at_most() -> None:
    b = keeper.Budget(4)
    assert [b.take(foreign=True) for _ in range(3)] == [True, True, False]
    assert [b.take() for _ in range(3)] == [True, True, False]
    b.give(foreign=True)
    assert b.take() and not b.take(foreign=True)


def test_who_holds_the_far_end_of_a_loopback_connection(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001 "
        "0 1 1 0000000000000000 20 4 30 10 -1\n"
        "   1: 0200007F:9C41 0200007F:1F91 01 00000000:00000000 00:00000000 00000000     0 "
        "0 2 1 0000000000000000 20 4 30 10 -1\n"
        "   2: garbage\n"
    )
    owners = keeper.peer_uids(str(table))
    if socket.htonl(1) == 1:  # (the table is in host order: this reads a little-endian one)
        pytest.skip("a big-endian host")
    assert owners == {("127.0.0.1", 40000, 8080): 1001, ("127.0.0.2", 40001, 8081): 0}
    assert keeper.peer_uids(str(tmp_path / "none")) is None


def test_a_connection_of_ours_is_told_apart_on_linux(keep: keeper.Keeper) -> None:
    if not keep.check_peers:
        pytest.skip("only Linux tells who holds a connection's far end")
    with socket.create_connection(("127.0.0.1", keep.port), timeout=5) as s:
        owners = keeper.peer_uids()
        assert owners is not None
        assert owners[(*s.getsockname(), keep.port)] == os.getuid()


def test_the_desk_tells_its_callers_uid() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        if desk.SO_PEERCRED is not None:
            assert desk.peer_uid(a) == os.getuid()
        assert desk.peer_uid(a, "none") is None
        if desk.SO_PEERCRED is not None:  # (Linux has no LOCAL_PEERCRED: said, not raised)
            assert desk.peer_uid(a, "xucred") in (None, os.getuid())


def test_the_keeper_without_knowing_whose_connections_are(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The portable way (no /proc/net/tcp): never asked, every connection the user's own."""
    asked: list[str] = []
    monkeypatch.setattr(keeper, "peer_uids", lambda *a: asked.append("asked"))
    up = Upstream(sock_path)
    k = keeper.Keeper(keeper.listen(0), sock_path, hold=3.0, budget=keeper.Budget(4))
    k.check_peers = False
    k.start()
    try:
        c = Client(k.port, GET)
        c.join(5)
        assert c.answer.endswith(b"GET /api/status HTTP/1.0")
        assert k.budget.foreign == 0 and asked == []
    finally:
        k.close()
        up.close()
