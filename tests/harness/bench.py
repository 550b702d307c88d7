"""`make bench`: jlremote against its baselines, measured side by side in one run.

Brings up the test-bed remote (tests/harness/testbed.py), alternates each measurement with its
baseline over several runs, and prints median/min/max, the ratio and the target. These
are figures for a report, not tests: nothing here asserts.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.harness.slurmbed import Cluster, available
from tests.harness.testbed import ALIAS, Testbed, wait_until

RUNS = int(os.environ.get("BENCH_RUNS", "9"))
JL = [sys.executable, "-m", "jlremote"]


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def http_ok(url: str, token: str | None = None) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"token {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def serving(runtime_dir: Path, address: str) -> bool:
    """Does the bare server whose runtime file is in RUNTIME_DIR answer on ADDRESS?"""
    for f in runtime_dir.glob("jpserver-*.json"):
        try:
            port = json.loads(f.read_text())["port"]
        except (ValueError, KeyError):
            return False  # still being written
        return http_ok(f"http://{address}:{port}/api/status", "bench")
    return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def download(url: str) -> int:
    """GET URL to the end, into one reused buffer: the client (a browser, in life) should
    not be what is measured, and on two cores its allocations would be."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    n = 0
    buf = bytearray(1 << 20)
    with opener.open(url, timeout=60) as r:
        while got := r.readinto(buf):
            n += got
    return n


# Runs on the remote, as its user: spawn JupyterLab as one would by hand, and time it to
# the first 200 from /api/status on the remote's own 127.0.0.1; print the seconds.
BARE = """
import json, os, pathlib, pwd, shutil, subprocess, sys, time, urllib.request
rt = pathlib.Path(sys.argv[1]); rt.mkdir(mode=0o700)
home = pwd.getpwuid(os.getuid()).pw_dir
env = dict(os.environ, HOME=home, JUPYTER_RUNTIME_DIR=str(rt), JUPYTER_TOKEN="bench",
           PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def up():
    for f in rt.glob("jpserver-*.json"):
        try:
            port = json.loads(f.read_text())["port"]
        except (ValueError, KeyError):
            return False
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                     headers={"Authorization": "token bench"})
        try:
            with opener.open(req, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    return False
t = time.perf_counter()
p = subprocess.Popen(["jupyter", "lab", "--no-browser", "--ip=127.0.0.1", "--port=0"],
                     env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    while not up():
        if p.poll() is not None or time.perf_counter() - t > 60:
            sys.exit("no server")
        time.sleep(0.02)
    print(time.perf_counter() - t)
finally:
    p.terminate(); p.wait(30); shutil.rmtree(rt, ignore_errors=True)
"""


class Bench:
    def __init__(self, bed: Testbed, state: Path) -> None:
        self.bed = bed
        self.env = dict(
            os.environ,
            JLREMOTE_SSH_CONFIG=bed.ssh_config,
            JLREMOTE_STATE_DIR=str(state),
            JLREMOTE_RUNTIME_DIR=str(Path(bed.workdir) / "rt"),  # removed with the test bed
        )
        self.rows: list[tuple[str, list[float], list[float] | None, str, float, str]] = []

    def jl(self, *args: str) -> str:
        out = subprocess.run(
            [*JL, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise RuntimeError(f"jlremote {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def ssh_true(self) -> None:
        subprocess.run(
            ["ssh", "-F", self.bed.ssh_config, "-o", "ControlPath=none", ALIAS, "true"],
            check=True,
            timeout=30,
        )

    def bare_jupyter(self) -> float:
        """JupyterLab started by hand on the remote, timed there (BARE: on its own
        loopback, from spawn to its first 200), so that neither `ip netns exec` nor the
        veth adds to the floor."""
        rt = Path(self.bed.home) / f".bench-rt-{time.monotonic_ns()}"
        out = self.bed.remote_run([f"{self.bed.remote_venv}/bin/python", "-c", BARE, str(rt)])
        if out.returncode != 0:
            raise RuntimeError(f"bare JupyterLab failed: {out.stderr}")
        return float(out.stdout.split()[-1])

    def row(
        self, what: str, ours: list[float], base: list[float] | None, target: float, kind: str
    ) -> None:
        self.rows.append((what, ours, base, kind, target, ""))

    def run(self) -> None:
        # Warm-up: first runs pay for cold caches on both sides.
        self.bare_jupyter()
        self.jl("start", ALIAS, "--no-open")
        self.jl("stop", ALIAS)

        cold, bare, hs = [], [], []
        for _ in range(RUNS):
            bare.append(self.bare_jupyter())
            hs.append(timed(self.ssh_true))
            cold.append(timed(lambda: self.jl("start", ALIAS, "--no-open")))
            self.jl("stop", ALIAS)
        base = [b + h for b, h in zip(bare, hs, strict=True)]
        self.row("cold start to verified URL", cold, base, 1.10, "ratio")
        self.row("  (baseline: bare JupyterLab, timed on the remote)", bare, None, 0, "info")
        self.row("  (baseline: one ssh handshake)", hs, None, 0, "info")

        self.jl("start", ALIAS, "--no-open")
        live, dead = [], []
        for _ in range(RUNS):
            live.append(timed(lambda: self.jl("start", ALIAS, "--no-open")))
            state = json.loads((Path(self.env["JLREMOTE_STATE_DIR"]) / "sessions.json").read_text())
            record = state["sessions"][ALIAS]
            # Supervisor too (else it heals the tunnel first): the local-reboot case.
            os.kill(record["supervisor_pid"], signal.SIGKILL)
            os.kill(record["tunnel"]["pid"], signal.SIGKILL)
            port = record["tunnel"]["local_port"]
            wait_until(lambda p=port: not port_open(p), 10, "the dead tunnel's port to close")
            dead.append(timed(lambda: self.jl("start", ALIAS, "--no-open")))
        self.row("start of a live session", live, None, 0.3, "seconds")
        self.row("start with the tunnel dead", dead, None, 0.6, "seconds")

        url = self.jl("start", ALIAS, "--no-open").strip().splitlines()[-1]
        token = url.split("token=")[1]
        size = 200 * 1024 * 1024
        self.bed.remote_run(
            [
                "dd",
                "if=/dev/zero",
                f"of={self.bed.home}/big.bin",
                "bs=1M",
                f"count={size >> 20}",
                "status=none",
            ]
        )
        rec = json.loads((Path(self.env["JLREMOTE_STATE_DIR"]) / "sessions.json").read_text())
        tun = rec["sessions"][ALIAS]["tunnel"]
        # The same far end as ours (the socket, or the TCP port), through a plain ssh -L.
        target = tun["remote_socket"] or f"127.0.0.1:{tun['remote_port']}"
        plain_port = 47000 + os.getpid() % 1000
        plain = subprocess.Popen(
            [
                "ssh",
                "-F",
                self.bed.ssh_config,
                "-N",
                "-o",
                "ControlPath=none",
                "-L",
                f"127.0.0.1:{plain_port}:{target}",
                ALIAS,
            ]
        )
        try:
            ours_url = url.split("/lab?")[0] + f"/files/big.bin?token={token}"
            plain_url = f"http://127.0.0.1:{plain_port}/files/big.bin?token={token}"
            wait_until(
                lambda: http_ok(f"http://127.0.0.1:{plain_port}/api/status", token),
                10,
                "plain forward",
            )
            ours_t, plain_t = [], []
            for _ in range(RUNS):
                plain_t.append(timed(lambda: download(plain_url)))
                ours_t.append(timed(lambda: download(ours_url)))
            # throughput ratio = plain time / our time (higher is better)
            self.rows.append(
                ("200 MB download, throughput", ours_t, plain_t, "throughput", 0.9, "")
            )
        finally:
            plain.terminate()
            plain.wait(10)
            self.bed.remote_run(["rm", "-f", f"{self.bed.home}/big.bin"])
        self.jl("stop", ALIAS)

        hosts = [ALIAS, f"{ALIAS}-b", f"{ALIAS}-c"]
        for i in range(10):
            self.jl("start", hosts[i % 3], "--name", f"s{i}", "--no-open")
        st, off = [], []
        for _ in range(RUNS):
            st.append(timed(lambda: self.jl("status")))
            off.append(timed(lambda: self.jl("status", "--offline")))
        self.row("status, 10 sessions on 3 hosts", st, None, 0.8, "seconds")
        self.row("status --offline", off, None, 0.2, "seconds")
        self.jl("stop", "--all")

        ver = [timed(lambda: self.jl("--version")) for _ in range(RUNS)]
        self.row("jlremote --version", ver, None, 0.15, "seconds")
        self.private()
        self.slurm()

    def private(self) -> None:
        """The private JupyterLab (#15) on an account with python3 and no Jupyter: the
        first install (wheels fetched here, then from the local cache), and later cold
        starts with it against cold starts of a JupyterLab on the PATH (root only)."""
        if not self.bed.bare_users:
            return
        self.env["XDG_CACHE_HOME"] = str(Path(self.bed.workdir) / "bench-cache")
        fetched = timed(lambda: self.jl("install", "bare"))
        self.jl("uninstall", "bare")
        cached = timed(lambda: self.jl("install", "bare"))
        self.row("private JupyterLab: first install, wheels fetched", [fetched], None, 0, "info")
        self.row("private JupyterLab: install, wheels from the cache", [cached], None, 0, "info")
        self.jl("start", "bare", "--no-open")  # warm-up
        self.jl("stop", "bare")
        ours, normal = [], []
        for _ in range(RUNS):
            normal.append(timed(lambda: self.jl("start", ALIAS, "--no-open")))
            self.jl("stop", ALIAS)
            ours.append(timed(lambda: self.jl("start", "bare", "--no-open")))
            self.jl("stop", "bare")
        self.row("cold start, private JupyterLab", ours, normal, 1.10, "ratio")
        self.row("  (baseline: cold start, JupyterLab on the PATH)", normal, None, 0, "info")

    def bare_job(self, cluster: Cluster) -> float:
        """By hand: sbatch (over one fresh ssh) a job that runs JupyterLab on the node's
        address, until the server answers there."""
        rt = Path(self.bed.home) / f".bench-job-{time.monotonic_ns()}"
        self.bed.remote_run(["mkdir", "-m", "700", str(rt)])
        wrap = (
            f"env JUPYTER_RUNTIME_DIR={rt} JUPYTER_TOKEN=bench jupyter lab --no-browser "
            f"--ip={cluster.address} --port=0"
        )
        t = time.perf_counter()
        out = subprocess.run(
            ["ssh", "-F", self.bed.ssh_config, "-o", "ControlPath=none", ALIAS,
             f"sbatch --parsable --output=/dev/null --wrap {shlex.quote(wrap)}"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        job = out.stdout.strip().split(";")[0]
        try:
            wait_until(
                lambda: serving(rt, cluster.address), 120, "the bare job's server", interval=0.02
            )
            return time.perf_counter() - t
        finally:
            cluster.run("scancel", job)
            wait_until(lambda: not cluster.jobs(), 30, "the bare job to end", interval=0.05)
            self.bed.remote_run(["rm", "-rf", str(rt)])

    def slurm(self) -> None:
        """start --slurm against sbatch by hand, on the one-node test cluster (root only)."""
        if available() is not None:
            return
        cluster = Cluster.create(self.bed)
        try:
            self.bare_job(cluster)  # warm-up
            ours, base = [], []
            for _ in range(RUNS):
                base.append(self.bare_job(cluster))
                ours.append(timed(lambda: self.jl("start", ALIAS, "--slurm", "--no-open")))
                self.jl("stop", ALIAS)
                wait_until(lambda: not cluster.jobs(), 30, "the job to end", interval=0.05)
            self.row("start --slurm to verified URL", ours, base, 1.15, "ratio")
            self.row("  (baseline: sbatch by hand until it answers)", base, None, 0, "info")
        finally:
            cluster.close()

    def table(self) -> str:
        lines = [
            f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
            f"runs per figure: {RUNS}",
            "",
            "| measurement | median s | min s | max s | N | ratio | target | result |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for what, ours, base, kind, target, _ in self.rows:
            med = statistics.median(ours)
            ratio = ""
            verdict = ""
            tgt = ""
            if kind == "ratio" and base:
                r = med / statistics.median(base)
                ratio, tgt, verdict = (
                    f"{r:.2f}",
                    f"<= {target:.2f} x baseline",
                    ("pass" if r <= target else "FAIL"),
                )
            elif kind == "throughput" and base:
                r = statistics.median(base) / med
                ratio, tgt, verdict = (
                    f"{r:.2f}",
                    f">= {target:.2f} x plain ssh -L",
                    ("pass" if r >= target else "FAIL"),
                )
            elif kind == "seconds":
                tgt, verdict = f"<= {target:.2f} s", "pass" if med <= target else "FAIL"
            lines.append(
                f"| {what} | {med:.3f} | {min(ours):.3f} | {max(ours):.3f} | "
                f"{len(ours)} | {ratio} | {tgt} | {verdict} |"
            )
        return "\n".join(lines)


def main() -> int:
    bed = Testbed.create()
    state = Path(bed.workdir) / "bench-state"
    try:
        bench = Bench(bed, state)
        try:
            bench.run()
        finally:
            subprocess.run(
                [*JL, "stop", "--all", "--forget", "--grace", "3"],
                env=bench.env,
                capture_output=True,
                timeout=120,
            )
        print(bench.table())
    finally:
        bed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
