"""The local end: free ports, the `ssh -N -L` tunnel process, and proving the URL works."""

from __future__ import annotations

import errno
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from jlremote import proc, ssh
from jlremote.errors import ExitCode, JlremoteError
from jlremote.state import Tunnel

log = logging.getLogger(__name__)


def pick_free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether we could listen on 127.0.0.1:`port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def require_free_port(port: int) -> None:
    """Fail clearly when the user's --local-port cannot be used."""
    if not port_is_free(port):
        raise JlremoteError(
            f"local port {port} is already in use; choose another --local-port or leave it out",
            ExitCode.LOCAL_PORT,
        )


def _find_process(argv: list[str]) -> psutil.Process | None:
    """The newest process whose command line is exactly `argv` (ssh -f's background child)."""
    best: psutil.Process | None = None
    for p in psutil.process_iter(["name", "cmdline", "create_time"]):
        try:
            if p.info["cmdline"] == argv and (
                best is None or p.info["create_time"] > best.info["create_time"]
            ):
                best = p
        except (psutil.Error, KeyError):
            continue
    return best


def open_tunnel(
    cfg: ssh.SshConfig, host: str, local_port: int, remote_port: int, log_path: Path
) -> Tunnel:
    """Start `ssh -f -N -L 127.0.0.1:L:127.0.0.1:R HOST`; ssh returns once it listens."""
    argv = ssh.tunnel_argv(cfg, host, local_port, remote_port)
    log_path.write_bytes(b"")
    done = proc.run(
        argv, timeout=cfg.connect_timeout + 20, output_file=log_path, what="opening the tunnel"
    )
    if done.returncode != 0:
        text = log_path.read_text(errors="replace")
        if "Address already in use" in text or "cannot listen to port" in text:
            raise JlremoteError(f"local port {local_port} is already in use", ExitCode.LOCAL_PORT)
        raise ssh.explain_failure(host, text)
    found = _find_process(argv)
    if found is None:
        raise JlremoteError(
            "the tunnel's ssh exited right after starting",
            ExitCode.TUNNEL,
            detail=log_path.read_text(errors="replace").strip(),
        )
    return Tunnel(local_port, remote_port, found.pid, found.create_time())


def tunnel_process(tunnel: Tunnel) -> psutil.Process | None:
    """The live tunnel process, only if PID, start time and command line all still match."""
    if tunnel.pid is None or tunnel.create_time is None:
        return None
    try:
        p = psutil.Process(tunnel.pid)
        if abs(p.create_time() - tunnel.create_time) > 0.01:
            return None
        if ssh.forward_spec(tunnel.local_port, tunnel.remote_port) not in p.cmdline():
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def close_tunnel(tunnel: Tunnel, grace: float = 3.0) -> bool:
    """Terminate our tunnel process (TERM, then KILL). False if it was already gone."""
    p = tunnel_process(tunnel)
    if p is None:
        return False
    try:
        p.terminate()
        _gone, alive = psutil.wait_procs([p], timeout=grace)
        for q in alive:
            q.kill()
        psutil.wait_procs(alive, timeout=grace)
    except psutil.NoSuchProcess:
        pass
    return True


def api_status(local_port: int, base_url: str, token: str, timeout: float) -> dict[str, Any] | None:
    """GET /api/status through the tunnel with the token; the JSON on 200, else None."""
    base = base_url if base_url.endswith("/") else base_url + "/"
    req = urllib.request.Request(
        f"http://127.0.0.1:{local_port}{base}api/status",
        headers={"Authorization": f"token {token}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(req, timeout=timeout) as resp:
            if resp.status != 200:
                return None
            body = json.loads(resp.read().decode() or "{}")
            return body if isinstance(body, dict) else {}
    except (OSError, urllib.error.URLError, ValueError):
        return None


def wait_for_api(local_port: int, base_url: str, token: str, timeout: float) -> dict[str, Any]:
    """Poll /api/status until it answers 200 or `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        answer = api_status(local_port, base_url, token, timeout=max(0.5, min(5.0, remaining)))
        if answer is not None:
            return answer
        if time.monotonic() >= deadline:
            raise JlremoteError(
                f"the server did not answer through the tunnel on port {local_port} "
                f"within {timeout:.0f}s",
                ExitCode.TUNNEL,
            )
        time.sleep(0.1)
