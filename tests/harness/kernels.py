"""Driving a kernel of a session the way JupyterLab does: REST to make, interrupt and
restart it, the kernel websocket to run a cell. And an eavesdropper: another user of the
remote who subscribes to every TCP port and Unix socket it can find there."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import websocket

from tests.harness.cli import api, token_of


def _post(url: str, path: str, body: bytes = b"{}") -> dict:  # type: ignore[type-arg]
    import urllib.request

    req = urllib.request.Request(api(url, path), data=body, method="POST")
    req.add_header("Authorization", f"token {token_of(url)}")
    req.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=60) as resp:
        text = resp.read().decode() or "{}"
        return json.loads(text)  # type: ignore[no-any-return]


def new_kernel(url: str) -> str:
    return str(_post(url, "api/kernels")["id"])


def interrupt(url: str, kernel: str) -> None:
    _post(url, f"api/kernels/{kernel}/interrupt")


def restart(url: str, kernel: str) -> None:
    _post(url, f"api/kernels/{kernel}/restart")


@dataclass
class Reply:
    status: str = ""  # of execute_reply: ok | error
    ename: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.output)


class Cell:
    """One execute_request over the kernel's websocket, as JupyterLab sends it."""

    def __init__(self, url: str, kernel: str, code: str) -> None:
        ws_url = api(url, f"api/kernels/{kernel}/channels").replace("http://", "ws://", 1)
        self.ws = websocket.create_connection(
            ws_url, timeout=60, header=[f"Authorization: token {token_of(url)}"]
        )
        self.msg_id = uuid.uuid4().hex
        header = {
            "msg_id": self.msg_id,
            "username": "test",
            "session": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "version": "5.3",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        content = {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        self.ws.send(
            json.dumps(
                {
                    "header": header,
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )

        self.reply = Reply()
        self.idle = False

    def _pump(self, done: Callable[[], bool], timeout: float) -> None:
        """Read the cell's messages until DONE() holds."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout}s: {self.reply}")
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
                continue
            kind = msg["header"]["msg_type"]
            content = msg["content"]
            if kind == "stream":
                self.reply.output.append(content["text"])
            elif kind == "error":
                self.reply.ename = content["ename"]
            elif kind == "execute_reply":
                self.reply.status = content["status"]
                self.reply.ename = self.reply.ename or content.get("ename", "")
            elif kind == "status" and content["execution_state"] == "idle":
                self.idle = True

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        """Until the cell has printed TEXT (it runs the user's code now)."""
        self._pump(lambda: text in self.reply.text, timeout)

    def wait(self, timeout: float = 60) -> Reply:
        """Collect the cell's output until its execute_reply and the kernel's idle."""
        try:
            self._pump(lambda: self.idle and bool(self.reply.status), timeout)
        finally:
            self.ws.close()
        return self.reply


def run_cell(url: str, kernel: str, code: str, timeout: float = 60) -> Reply:
    return Cell(url, kernel, code).wait(timeout)


# Run by another user on the remote with the remote's Python (it has pyzmq): subscribe to
# every listening TCP port of the remote's loopback and every Unix socket under the usual
# places, wait (bounded) until every TCP subscription is connected, print READY, listen for
# SECONDS, then print what it saw as JSON (`connected`: the TCP subscriptions that were).
EAVESDROPPER = r"""
import json, os, socket, stat, sys, time
import zmq
from zmq.utils.monitor import recv_monitor_message as event
secret, seconds = sys.argv[1].encode(), float(sys.argv[2])
ctx = zmq.Context()
ports, paths, socks, monitors = set(), [], [], []
def address(hex_addr):  # /proc/net/tcp*: 32-bit words in host (little-endian) order
    raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
    if not any(raw):  # listening on every address: take the loopback
        return "127.0.0.1" if len(raw) == 4 else "[::1]"
    text = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return text if len(raw) == 4 else f"[{text}]"
for name in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(name).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        cols = row.split()
        if cols[3] == "0A":
            host, port = cols[1].rsplit(":", 1)
            ports.add((address(host), int(port, 16)))
for top in ("/tmp", "/home", "/run", "/var/tmp", "/dev/shm"):
    for root, dirs, files in os.walk(top, onerror=lambda e: None):
        for f in files:
            p = os.path.join(root, f)
            try:
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    paths.append(p)
            except OSError:
                pass
for host, port in sorted(ports):
    s = ctx.socket(zmq.SUB); s.setsockopt(zmq.SUBSCRIBE, b""); s.setsockopt(zmq.LINGER, 0)
    monitors.append(s.get_monitor_socket(zmq.EVENT_CONNECTED))
    s.connect(f"tcp://{host}:{port}"); socks.append(s)
for p in paths:
    s = ctx.socket(zmq.SUB); s.setsockopt(zmq.SUBSCRIBE, b""); s.setsockopt(zmq.LINGER, 0)
    s.connect("ipc://" + p); socks.append(s)
poller = zmq.Poller()
for s in socks:
    poller.register(s, zmq.POLLIN)
waiting, end = set(range(len(monitors))), time.monotonic() + 10
while waiting and time.monotonic() < end:
    for i in list(waiting):
        if monitors[i].poll(10) and event(monitors[i])["event"] == zmq.EVENT_CONNECTED:
            waiting.discard(i)
connected = len(monitors) - len(waiting)
print("READY", flush=True)
frames, seen = 0, False
end = time.monotonic() + seconds
while time.monotonic() < end:
    for s, _ in poller.poll(100):
        while True:
            try:
                parts = s.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            frames += 1
            seen = seen or any(secret in part for part in parts)
print(json.dumps({"ports": sorted(p for _, p in ports), "connected": connected,
                  "sockets": paths, "frames": frames, "seen": seen}))
"""
