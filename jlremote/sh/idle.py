"""jlremote's idle watcher: beside a session's server, on the remote (or in its job).

    python3 idle.py DIR RUNTIME ENDED

DIR is the session directory (its `idle` file holds `SECONDS LABEL`, its `token` the
token), RUNTIME where the server writes its jpserver-PID.json, ENDED the directory where
why a server ended is kept. Every few seconds it asks the server, through the API and
without counting as activity: a kernel busy or starting, or any open connection, is
activity; so is whatever the server itself counts (`last_activity`). After SECONDS
without any, it records `idle for LABEL` in ENDED/SESSION and asks the server to shut
down (kernels stopped cleanly); in a Slurm job, the job ends with it. It exits with the
server. Standard library only: it runs on whatever python3 the remote has.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import signal
import socket
import sys
import time
from datetime import datetime


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _server(runtime: str, session_dir: str) -> tuple[int, dict[str, object]] | None:
    """The server's pid and runtime facts once its file is complete; None while the
    session directory exists and the file does not yet."""
    while os.path.isdir(session_dir):
        for path in glob.glob(os.path.join(runtime, "jpserver-*.json")):
            try:
                with open(path) as f:
                    info = json.load(f)
                return int(info["pid"]), info
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.5)
    return None


def _when(text: object) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def main() -> int:
    session_dir, runtime, ended_dir = sys.argv[1:4]
    with open(os.path.join(session_dir, "idle")) as f:
        limit_text, label = f.read().split()
    limit = int(limit_text)
    tick = min(10.0, max(1.0, limit / 10))
    found = _server(runtime, session_dir)
    if found is None:
        return 0
    pid, info = found
    with open(os.path.join(session_dir, "token")) as f:
        token = f.read().strip()
    base = str(info.get("base_url") or "/").rstrip("/")
    sock = str(info.get("sock") or "")
    host = str(info.get("hostname") or "127.0.0.1")
    port = int(str(info.get("port") or 0))

    def call(method: str, path: str) -> object:
        conn = (
            _UnixConnection(sock, 10)
            if sock
            else http.client.HTTPConnection(host, port, timeout=10)
        )
        try:
            conn.request(method, base + path, headers={"Authorization": "token " + token})
            reply = conn.getresponse()
            body = reply.read()
        finally:
            conn.close()
        if reply.status >= 400:
            raise OSError(f"{method} {path}: HTTP {reply.status}")
        return json.loads(body) if body else None

    def wait(seconds: float) -> bool:
        """Sleep; False as soon as the server or its session directory is gone."""
        end = time.time() + seconds
        while _alive(pid) and os.path.isdir(session_dir):
            if time.time() >= end:
                return True
            time.sleep(0.25)
        return False

    active = time.time()
    while wait(0):
        try:
            st = call("GET", "/api/status")
            kernels = call("GET", "/api/kernels?no_track_activity=1")
        except (OSError, ValueError, http.client.HTTPException):
            wait(tick)
            continue
        try:
            terminals = call("GET", "/api/terminals?no_track_activity=1")
        except (OSError, ValueError, http.client.HTTPException):
            terminals = []
        now = time.time()
        ks = kernels if isinstance(kernels, list) else []
        ts = terminals if isinstance(terminals, list) else []
        busy = any(k.get("execution_state") in ("busy", "starting") for k in ks)
        if busy or (isinstance(st, dict) and int(st.get("connections") or 0) > 0):
            active = now
        else:
            seen = [st.get("last_activity") if isinstance(st, dict) else None]
            seen += [x.get("last_activity") for x in ks + ts]
            active = max([active, *(_when(t) for t in seen if t)])
        if now - active >= limit:
            print(f"idle for {label}: shutting the server down", flush=True)
            os.makedirs(ended_dir, mode=0o700, exist_ok=True)
            with open(os.path.join(ended_dir, os.path.basename(session_dir)), "w") as f:
                f.write(f"idle for {label}\n")
            try:
                call("POST", "/api/shutdown")
            except (OSError, ValueError, http.client.HTTPException):
                os.kill(pid, signal.SIGTERM)
            deadline = time.time() + 60
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            return 0
        wait(tick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
