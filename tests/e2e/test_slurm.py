"""`start --slurm` end to end: the real CLI, the namespace remote as the login host, and a
real one-node Slurm cluster (tests/harness/slurmbed.py) whose node is reachable from the login
host only by its own address."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_start import assert_nothing_left, jupyter_pids
from tests.e2e.test_tooling import run_under_pty
from tests.harness.cli import Jl, api, assert_one_error_line, http_get, token_of
from tests.harness.kernels import new_kernel, run_cell
from tests.harness.slurmbed import NODE, Cluster, available
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(available() is not None, reason=str(available())),
]


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[Cluster]:
    c = Cluster.create(testbed)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def sjl(jl: Jl, cluster: Cluster) -> Iterator[Jl]:
    """The CLI runner; afterwards no job of the test user may be left in the queue."""
    yield jl
    jl("stop", "--all", "--forget", "--grace", "3")
    left = cluster.jobs()
    if left:
        cluster.run("scancel", "-u", cluster.user)
    assert not left, f"jobs left in the queue: {left}"


def session_dirs(bed: Testbed) -> list[Path]:
    root = Path(bed.home) / ".jlremote" / "sessions"
    return sorted(root.iterdir()) if root.exists() else []


def test_start_status_stop_in_a_job(sjl: Jl, testbed: Testbed, cluster: Cluster) -> None:
    project = Path(testbed.home) / "project"
    project.mkdir(exist_ok=True)
    (project / "data.csv").write_text("x\n")
    r = sjl(
        "start", ALIAS, "--slurm", "--sbatch", "-t 04:00:00 -J jlr-test",
        "--dir", "project", "--env", 'echo "$SLURM_JOB_ID" > "$HOME/env-ran"',
    )  # fmt: skip
    assert r.rc == 0, r.stderr
    url, token = r.url, token_of(r.url)
    assert r.stdout.strip() == url  # stdout carries only the URL
    assert http_get(api(url, "api/status"), token)[0] == 200
    status, body = http_get(api(url, "api/contents"), token)
    assert status == 200 and "data.csv" in [e["name"] for e in json.loads(body)["content"]]

    record = sjl.sessions()[ALIAS]
    job_id = record["server"]["job_id"]
    assert job_id and record["server"]["node"] == NODE
    # The tunnel goes to the node's own address through the login host, not to the login
    # host's loopback (where nothing listens: the job runs on the other side of the veth).
    assert record["tunnel"]["remote_host"] == cluster.address
    assert (Path(testbed.home) / "env-ran").read_text().strip() == job_id  # --env ran in it
    assert cluster.jobs() == [
        {"id": job_id, "state": "RUNNING", "reason": "None", "node": NODE, "name": "jlr-test"}
    ]

    rows = sjl("status", "--json").json()
    assert [(x["job_id"], x["node"], x["job_state"], x["server"]) for x in rows] == [
        (job_id, NODE, "RUNNING", "running")
    ]
    assert rows[0]["time_left"].startswith(("3:59:", "4:00:00"))
    text = sjl("status").stdout
    assert all(word in text for word in ("JOB", "NODE", job_id, "RUNNING", "3:59:"))

    # The token is in no process's argv and not in the job script Slurm keeps.
    for p in psutil.process_iter(["cmdline"]):
        assert token not in " ".join(p.info["cmdline"] or []), p.info["cmdline"]
    script = cluster.run("scontrol", "write", "batch_script", job_id, "-").stdout
    assert "jupyter" in script and token not in script
    shown = cluster.run("scontrol", "show", "job", "-dd", job_id).stdout
    assert token not in shown

    again = sjl("start", ALIAS, "--slurm", "--sbatch", "-t 04:00:00 -J jlr-test", "--json")
    assert again.rc == 0 and again.json()["reused"] and again.json()["url"] == url
    assert len(cluster.jobs()) == 1

    pids = jupyter_pids(testbed)
    assert len(pids) == 1
    stop = sjl("stop", ALIAS)
    assert stop.rc == 0 and stop.stdout == "", stop.stderr
    assert cluster.jobs() == []
    assert cluster.job_state(job_id) in ("CANCELLED", "FORGOTTEN")
    wait_until(lambda: not jupyter_pids(testbed), 15, "the job's server to exit")
    assert session_dirs(testbed) == []
    assert_nothing_left(testbed, sjl)


def test_a_job_cancelled_from_outside_shows_as_gone(
    sjl: Jl, testbed: Testbed, cluster: Cluster
) -> None:
    r = sjl("start", ALIAS, "--slurm", "--name", "hpc", "--notebook")
    assert r.rc == 0, r.stderr
    assert "/tree?token=" in r.url and http_get(r.url)[0] == 200  # --notebook in the job
    record = sjl.sessions()["hpc"]
    job_id = record["server"]["job_id"]
    # The supervisor heals a killed tunnel to the node, on the same local port.
    os.kill(record["tunnel"]["pid"], signal.SIGKILL)
    status_url = api(r.url, "api/status")
    wait_until(
        lambda: http_get(status_url, token_of(r.url), timeout=2)[0] == 200,
        30,
        "the healed tunnel to answer",
        interval=0.2,
    )
    assert cluster.run("scancel", job_id).returncode == 0

    def gone() -> list[dict[str, str]] | None:
        rows = sjl("status", "--json").json()
        return rows if rows[0]["server"] == "gone" else None

    rows = wait_until(gone, 30, "status to say the job's server is gone", interval=0.2)
    assert rows[0]["job_state"] in ("CANCELLED", "COMPLETING", "")
    stop = sjl("stop", "hpc")
    assert stop.rc == 0, stop.stderr
    assert sjl.sessions() == {} and session_dirs(testbed) == []
    wait_until(lambda: not jupyter_pids(testbed), 15, "the job's server to exit")


def test_sbatch_refusal_is_clear_and_queues_nothing(
    sjl: Jl, testbed: Testbed, cluster: Cluster
) -> None:
    r = sjl("start", ALIAS, "--slurm", "--sbatch", "-p nosuch")
    assert r.rc == 6, r.stderr
    assert_one_error_line(r.stderr, "sbatch refused the job", "Invalid partition")
    assert cluster.jobs() == []
    assert session_dirs(testbed) == []
    assert_nothing_left(testbed, sjl)


def test_pending_job_is_cancelled_at_timeout(sjl: Jl, testbed: Testbed, cluster: Cluster) -> None:
    # On a terminal, the live line says the job is queued and why.
    rc, out, err = run_under_pty(
        sjl, "start", ALIAS, "--slurm", "--sbatch", "--partition=closed", "--timeout", "10"
    )
    assert rc == 7 and out == "", err
    assert re.search(r"job \d+ queued \(PartitionDown\) \(\d+\.\ds\)", err), err
    assert_one_error_line(err.replace("\r\x1b[K", "\n"), "pending after 10s", "PartitionDown")
    assert "cancelled it" in err
    assert cluster.jobs() == []
    assert session_dirs(testbed) == []
    assert_nothing_left(testbed, sjl)


def test_job_errors_name_the_cause(sjl: Jl, testbed: Testbed, cluster: Cluster) -> None:
    r = sjl("start", ALIAS, "--slurm", "--jupyter", "no-such-jupyter")
    assert r.rc == 6, r.stderr
    assert_one_error_line(r.stderr, "'no-such-jupyter' not found on the compute node")
    r = sjl("start", ALIAS, "--slurm", "--sbatch", "run.sh")
    assert r.rc == 2
    assert_one_error_line(r.stderr, "--sbatch takes options only")
    assert cluster.jobs() == []
    assert_nothing_left(testbed, sjl)


def test_doctor_checks_what_slurm_needs(sjl: Jl, testbed: Testbed, cluster: Cluster) -> None:
    good = sjl("doctor", ALIAS, "--slurm", "--json")
    assert good.rc == 0, good.stdout
    checks = {c["name"]: c for c in good.json()["checks"]}
    assert checks["slurm"]["status"] == "ok"
    assert "debug* (up), closed (down)" in checks["slurm"]["detail"]
    # What a job's server is open to, said plainly.
    assert checks["privacy-slurm"]["status"] == "warn"
    assert "decided per job" in checks["privacy-slurm"]["detail"]
    bad = sjl("doctor", ALIAS, "--slurm", "--sbatch", "-p nosuch")
    assert bad.rc == 6 and "no partition 'nosuch'" in bad.stdout
    down = sjl("doctor", ALIAS, "--slurm", "--sbatch", "--partition=closed", "--json")
    assert down.rc == 0
    checks = {c["name"]: c for c in down.json()["checks"]}
    assert checks["slurm"]["status"] == "warn" and "is down" in checks["slurm"]["detail"]


def test_a_controller_that_does_not_answer_is_not_taken_for_an_ended_job(
    sjl: Jl, testbed: Testbed, cluster: Cluster
) -> None:
    r = sjl("start", ALIAS, "--slurm")
    assert r.rc == 0, r.stderr
    record = sjl.sessions()[ALIAS]
    session_dir = Path(record["server"]["session_dir"])
    cluster.stop_controller()
    try:
        rows = sjl("status", "--json").json()
        assert rows[0]["server"] == "unknown"
        assert "did not answer about job" in rows[0]["error"]
        assert http_get(api(r.url, "api/status"), token_of(r.url))[0] == 200  # still serving
        stop = sjl("stop")
        assert stop.rc != 0 and "Slurm did not answer" in stop.stderr
        # Nothing was taken for ended: the record, the directory and the server are there.
        assert ALIAS in sjl.sessions() and session_dir.is_dir()
        assert len(jupyter_pids(testbed)) == 1
    finally:
        cluster.start_controller()
    stop = sjl("stop")
    assert stop.rc == 0, stop.stderr
    assert cluster.jobs() == [] and not session_dir.exists()
    wait_until(lambda: not jupyter_pids(testbed), 15, "the job's server to exit")


def test_kernels_in_a_job_talk_over_private_sockets(sjl: Jl, testbed: Testbed) -> None:
    from tests.harness.kernels import new_kernel, run_cell

    r = sjl("start", ALIAS, "--slurm")
    assert r.rc == 0, r.stderr
    kernel = new_kernel(r.url)
    code = (
        "import os\n"
        f"print(any({token_of(r.url)!r} in v for v in os.environ.values()), os.getpid())\n"
    )
    assert run_cell(r.url, kernel, code).text.startswith("False ")
    run_dir = Path(sjl.sessions()[ALIAS]["server"]["session_dir"])
    files = [json.loads(p.read_text()) for p in run_dir.glob("kernel-*.json")]
    assert [f["transport"] for f in files] == ["ipc"]
    status = sjl("status", "--json").json()
    assert status[0]["exposure"] == "cluster"  # no sshd on the node: its cluster address
    checks = {c["name"]: c for c in sjl("doctor", ALIAS, "--slurm", "--json").json()["checks"]}
    assert checks["privacy-slurm"]["status"] == "warn"
    assert "no ssh to jlrnode" in checks["privacy-slurm"]["detail"]
    assert "every user of the cluster can connect" in checks["privacy-slurm"]["detail"]


@pytest.fixture
def node_sshd(cluster: Cluster, testbed: Testbed) -> Iterator[None]:
    cluster.start_node_sshd(testbed)
    try:
        yield
    finally:
        cluster.stop_node_sshd()


def test_a_node_that_accepts_ssh_serves_on_a_private_socket(
    sjl: Jl, testbed: Testbed, cluster: Cluster, node_sshd: None
) -> None:
    """Where the user's ssh reaches the job's node through the login host, the server
    listens on a 0600 Unix socket there, not on the node's cluster address."""
    r = sjl("start", ALIAS, "--slurm")
    assert r.rc == 0, r.stderr
    url, token = r.url, token_of(r.url)
    assert http_get(api(url, "api/status"), token)[0] == 200
    record = sjl.sessions()[ALIAS]
    assert record["tunnel"]["node"] == NODE and record["server"]["sock"]
    assert record["tunnel"]["remote_host"] == "" and record["server"]["port"] == 0
    sock = Path(record["server"]["sock"])
    assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600
    # The server (the job's own process) listens on no TCP port of the node.
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    assert f"pid={record['server']['pid']}," not in listening, listening
    row = sjl("status", "--json").json()[0]
    assert row["exposure"] == "private" and row["server"] == "running"
    checks = {c["name"]: c for c in sjl("doctor", ALIAS, "--slurm", "--json").json()["checks"]}
    assert checks["privacy-slurm"]["status"] == "ok", checks["privacy-slurm"]
    # The tunnel heals through the login host to the node.
    os.kill(record["tunnel"]["pid"], signal.SIGKILL)
    wait_until(
        lambda: (
            sjl.sessions()[ALIAS]["tunnel"]["pid"] != record["tunnel"]["pid"]
            and http_get(api(url, "api/status"), token)[0] == 200
        ),
        60,
        "the tunnel to the node to heal",
        interval=0.2,
    )
    assert sjl("stop", ALIAS).rc == 0
    wait_until(lambda: not cluster.jobs(), 30, "the job to end", interval=0.1)


def test_a_job_with_the_private_jupyterlab_has_the_env_kernel(
    sjl: Jl, testbed: Testbed, cluster: Cluster, wheel_cache: Path
) -> None:
    """No jupyter on the job's PATH, the private JupyterLab in the home, and --env naming
    a Python with ipykernel: the job's server offers that Python as its default kernel,
    "Python (--env)", as a server on the host does (one shell function chooses for both)."""
    sjl.env["XDG_CACHE_HOME"] = str(wheel_cache)
    home = Path(testbed.home)
    kenv = home / "kenv" / "bin"
    try:
        installed = sjl("install", ALIAS, "--json", timeout=900)
        assert installed.rc == 0, installed.stderr
        kenv.mkdir(parents=True)
        (kenv / "python3").write_text(f'#!/bin/sh\nexec {testbed.remote_venv}/bin/python3 "$@"\n')
        os.chmod(kenv / "python3", 0o755)
        uid = pwd.getpwnam(testbed.user).pw_uid
        for p in (kenv.parent, kenv, kenv / "python3"):
            os.chown(p, uid, uid)
        env = 'export PATH="$HOME/kenv/bin:/usr/bin:/bin"'  # (no jupyter on it)
        r = sjl("start", ALIAS, "--slurm", "--env", env, "--json", timeout=300)
        assert r.rc == 0, r.stderr
        url = r.json()["url"]
        status, body = http_get(api(url, "api/kernelspecs"), token_of(url))
        assert status == 200, body
        specs = json.loads(body)
        assert specs["default"] == "env"
        assert specs["kernelspecs"]["env"]["spec"]["display_name"] == "Python (--env)"
        cell = run_cell(url, new_kernel(url), "import sys; print(sys.executable)")
        assert cell.text.strip() == f"{testbed.remote_venv}/bin/python3"
        assert sjl("stop", ALIAS).rc == 0
    finally:
        sjl("stop", "--all", "--forget", "--grace", "3")
        sjl("uninstall", ALIAS)
        subprocess.run(["rm", "-rf", str(kenv.parent)], check=False)
