"""The local end: free ports, the tunnel's own ssh master and its forward, and proving the
URL works."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jlremote import loopback, proc, ssh
from jlremote.errors import ExitCode, JlremoteError
from jlremote.state import Tunnel

if TYPE_CHECKING:
    pass

# psutil and urllib are imported where they are used: a cold `start` imports them in a
# worker thread while the remote server boots, off the path to the URL.


def preload() -> None:
    """Import what verification needs (called from a thread that is waiting anyway)."""
    import urllib.request  # noqa: F401

    import psutil  # noqa: F401


log = logging.getLogger(__name__)


def pick_free_port(avoid: set[int] | None = None) -> int:
    """A port on 127.0.0.1 that nothing listens on right now (and not one of AVOID)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not avoid or port not in avoid:
            return port


def port_is_free(port: int, address: str = loopback.JUPYTER) -> bool:
    """Whether we could listen on ADDRESS:`port` now. As ssh binds it (SO_REUSEADDR): the
    connections a dead tunnel leaves in TIME_WAIT do not keep the port from us, a listener
    does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def require_free_port(port: int, address: str = loopback.JUPYTER) -> None:
    """Fail clearly when the user's --local-port (or an app's) cannot be used."""
    if not port_is_free(port, address):
        raise JlremoteError(
            f"local port {port} is already in use; choose another --local-port or leave it out",
            ExitCode.LOCAL_PORT,
        )


def master_path(session_id: str) -> str:
    """Where the tunnel master of a session keeps its control socket."""
    from jlremote.paths import runtime_dir

    return str(runtime_dir() / f"tun-{session_id}")


def start_master(
    cfg: ssh.SshConfig, host: str, session_id: str, log_path: Path, node: str = ""
) -> Tunnel:
    """Open the tunnel's own ssh connection (no forward yet); returns once authenticated.
    With NODE, to that compute node through HOST.

    Ports are 0 until add_forward() is called.
    """
    path = master_path(session_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket from a master that was killed
    log_path.write_bytes(b"")
    done = proc.run(
        ssh.tunnel_master_argv(cfg, host, path, str(log_path), node),
        timeout=cfg.connect_timeout + 30,
        output_file=log_path,
        what=f"connecting to {host}",
    )
    if done.returncode != 0:
        raise ssh.explain_failure(node or host, log_path.read_text(errors="replace"))
    check = proc.run(ssh.check_master_argv(cfg, host, path), timeout=10, what="ssh -O check")
    found = re.search(r"pid=(\d+)", check.stderr + check.stdout)
    if check.returncode != 0 or not found:
        raise JlremoteError(
            "the tunnel's ssh exited right after starting",
            ExitCode.TUNNEL,
            detail=log_path.read_text(errors="replace").strip(),
        )
    pid = int(found.group(1))
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        raise JlremoteError(
            "the tunnel's ssh exited right after starting", ExitCode.TUNNEL
        ) from None
    return Tunnel(0, 0, pid, created, path, node=node)


def forward_path(local_port: int) -> str:
    """The private Unix socket where the tunnel of the session on LOCAL_PORT listens: the
    session's keeper (jlremote.keeper), which holds 127.0.0.1:LOCAL_PORT, carries each
    connection there. ssh makes it 0600 (StreamLocalBindMask), in the 0700 runtime
    directory, and replaces a stale one (StreamLocalBindUnlink)."""
    from jlremote.paths import runtime_dir

    return str(runtime_dir() / f"port-{local_port}")


def desk_path(local_port: int) -> str:
    """Where the supervisor of the session on LOCAL_PORT takes more ports to hold (the
    ports of its other apps): a 0600 Unix socket in the 0700 runtime directory."""
    from jlremote.paths import runtime_dir

    return str(runtime_dir() / f"keep-{local_port}")


def add_forward(
    cfg: ssh.SshConfig,
    host: str,
    master: Tunnel,
    local_port: int,
    target: ssh.Target,
) -> Tunnel:
    """Make the tunnel's master forward the session's socket (see forward_path) to TARGET;
    the session's keeper holds 127.0.0.1:LOCAL_PORT and carries its connections there."""
    forward(cfg, host, master, forward_path(local_port), target)
    return replace(
        master,
        local_port=local_port,
        remote_port=target.port,
        remote_socket=target.socket,
        remote_host=target.host,
    )


def forward(
    cfg: ssh.SshConfig,
    host: str,
    master: Tunnel,
    listen: int | str,
    target: ssh.Target,
    cancel: bool = False,
) -> None:
    """One more forward over the master's connection (`ssh -O forward`: no new connection)
    from 127.0.0.1:LISTEN or the Unix socket at path LISTEN, or with CANCEL, one less."""
    done = proc.run(
        ssh.forward_argv(cfg, host, master.control_path, listen, target, cancel),
        timeout=15,
        what="removing the forward" if cancel else "adding the forward",
    )
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()
        said = last[-1] if last else "ssh failed"
        what = f"port {listen}" if isinstance(listen, int) else "the session's socket"
        if cancel:
            raise JlremoteError(f"could not stop forwarding {what}: {said}")
        if isinstance(listen, int) and not port_is_free(listen):
            raise JlremoteError(f"local port {listen} is already in use", ExitCode.LOCAL_PORT)
        raise JlremoteError(f"could not forward {what}: {said}", ExitCode.TUNNEL)


def answers_http(port: int, timeout: float = 1.0, address: str = loopback.JUPYTER) -> bool:
    """Whether something answers HTTP on ADDRESS:PORT (any status line counts)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"HEAD / HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            return s.recv(5) == b"HTTP/"
    except OSError:
        return False


def open_tunnel(
    cfg: ssh.SshConfig,
    host: str,
    session_id: str,
    local_port: int,
    target: ssh.Target,
    log_path: Path,
    check: Callable[[Tunnel], None] | None = None,
    node: str = "",
) -> Tunnel:
    """The tunnel's own connection (to NODE through HOST, with a node) plus its forward,
    in one go. CHECK runs through the new connection before anything listens (it raises
    to stop the forward)."""
    master = start_master(cfg, host, session_id, log_path, node)
    try:
        if check is not None:
            check(master)
        return add_forward(cfg, host, master, local_port, target)
    except BaseException:
        close_tunnel(master)
        raise


def owned(tunnel: Tunnel) -> proc.Owned:
    """The tunnel's ssh: its PID, create time and control socket (in its argv)."""
    return proc.Owned(tunnel.pid, tunnel.create_time, (tunnel.control_path,))


def is_up(tunnel: Tunnel) -> bool:
    """Whether the tunnel's own ssh runs (PID, start time and command line all match)."""
    return owned(tunnel).alive()


def close_tunnel(tunnel: Tunnel, grace: float = 3.0, search: bool = False) -> bool:
    """Terminate our tunnel process (TERM, then KILL). False if it was already gone.

    A master that no record names (its start was interrupted) still holds the control
    socket; only then are processes searched for it. With SEARCH, they are searched for
    anyway: one may still be connecting (no control socket yet).
    """
    was_up = owned(tunnel).stop(grace)
    if tunnel.control_path and (search or os.path.exists(tunnel.control_path)):
        _kill_masters(tunnel.control_path, grace)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tunnel.control_path)
    return was_up


def _kill_masters(control_path: str, grace: float) -> None:
    import psutil

    marker = f"ControlPath={control_path}"
    me = os.getuid()
    for q in psutil.process_iter(["cmdline", "uids"]):
        try:
            cmd = q.info["cmdline"] or []
            # Only a process of ours: another user's, whatever its argv says, is not.
            mine = q.info["uids"] is not None and q.info["uids"].real == me
        except psutil.Error:
            continue
        if mine and marker in cmd and "-N" in cmd:
            proc.terminate(q, grace)


def api_status(local_port: int, base_url: str, token: str, timeout: float) -> dict[str, Any] | None:
    """GET /api/status through the tunnel with the token; the JSON on 200, else None."""
    import urllib.error
    import urllib.request

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


def wait_for_api(
    local_port: int, base_url: str, token: str, timeout: float, log_path: Path | None = None
) -> dict[str, Any]:
    """Poll /api/status until it answers 200 or `timeout` runs out. With the tunnel's
    `log_path`, stop early once ssh says the far end refused the connection."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        answer = api_status(local_port, base_url, token, timeout=max(0.5, min(5.0, remaining)))
        if answer is not None:
            return answer
        refused = log_path is not None and "open failed" in log_path.read_text(errors="replace")
        if refused or time.monotonic() >= deadline:
            logged = log_path.read_text(errors="replace").strip() if log_path else ""
            # Each line once: ssh says the same refusal again for every connection tried
            # (the port's keeper tries a refused request again, as after a dying tunnel).
            said = "\n".join(dict.fromkeys(logged.splitlines()))
            failed = [line for line in said.splitlines() if "open failed" in line]
            why = f" (the remote end refused the forward: {failed[-1].strip()})" if failed else ""
            raise JlremoteError(
                f"the server did not answer through the tunnel on port {local_port}"
                + (why or f" within {timeout:.0f}s"),
                ExitCode.TUNNEL,
                detail=said,
            )
        time.sleep(0.1)
