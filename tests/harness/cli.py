"""The harness's runner of the real CLI, and the helpers the end-to-end tests share."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def url(self) -> str:
        return self.stdout.strip().splitlines()[-1]

    def json(self):  # type: ignore[no-untyped-def]
        return json.loads(self.stdout)


class Jl:
    """Runs `python -m jlremote ...` as a real process, with its own state dir."""

    def __init__(self, env: dict[str, str], state_dir: Path, runtime_dir: Path) -> None:
        self.env = env
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir

    def __call__(
        self,
        *args: str,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "jlremote", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "jlremote", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )

    def sessions(self) -> dict[str, dict]:  # type: ignore[type-arg]
        path = self.state_dir / "sessions.json"
        if not path.exists():
            return {}
        return json.loads(path.read_text())["sessions"]  # type: ignore[no-any-return]


def http_get(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """GET through the tunnel; (status, body). Connection failures are status 0."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"token {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def token_of(url: str) -> str:
    return url.split("token=", 1)[1]


def api(url: str, path: str) -> str:
    """http://127.0.0.1:P/lab?token=T -> http://127.0.0.1:P/<path>"""
    base = url.split("?", 1)[0].rsplit("/", 1)[0]
    return f"{base}/{path}"


def kill_supervisors(state_dir: Path) -> list[int]:
    """Kill (and name) the supervisors that serve STATE_DIR, and their guards, as a
    reboot would: all at once with SIGKILL, each guard before its supervisor (a guard
    brings a dead supervisor back at once; a supervisor waits 0.2 s before it starts a
    new guard). Their tunnels' ssh processes are left as they are."""
    import time

    import psutil

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                mine = "jlremote.supervisor" in cmd or "jlremote.guard" in cmd
                if mine and p.environ().get("JLREMOTE_STATE_DIR") == str(state_dir):
                    found.append(p)
            except psutil.Error:
                continue
        return sorted(found, key=lambda p: "jlremote.guard" not in (p.info["cmdline"] or []))

    killed: list[psutil.Process] = []
    for _ in range(2):  # (the second: any that a dying one started meanwhile)
        found = ours()
        for p in found:
            with contextlib.suppress(psutil.Error):
                age = time.time() - p.create_time()
                print(f"stray supervisor or guard {p.pid}: {p.info['cmdline']} age {age:.1f}s")
                p.kill()
                killed.append(p)
        psutil.wait_procs(found, timeout=5)
    return [p.pid for p in killed]


def assert_one_error_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("jlremote: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], stderr
