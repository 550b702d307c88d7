"""Queues and idle servers (#12), end to end: the real CLI, the namespace remote, and for
--slurm the real one-node test cluster (tests/harness/slurmbed.py), filled by a blocking
job so that the next one pends with reason Resources."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_slurm import cluster, session_dirs, sjl  # noqa: F401 (fixtures)
from tests.e2e.test_start import jupyter_pids
from tests.e2e.test_tooling import run_under_pty
from tests.harness.cli import Jl, api, assert_one_error_line, http_get, token_of
from tests.harness.kernels import Cell, new_kernel
from tests.harness.slurmbed import Cluster, available
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = pytest.mark.e2e
needs_slurm = pytest.mark.skipif(available() is not None, reason=str(available()))


def status_of(jl: Jl, name: str = ALIAS) -> dict[str, object]:
    rows = {r["name"]: r for r in jl("status", "--json").json()}
    return rows[name]  # type: ignore[no-any-return]


def status_when(
    jl: Jl, key: str, value: object, timeout: float, name: str = ALIAS
) -> dict[str, object]:
    """NAME's `status --json` row once its KEY is VALUE (None: anything but empty)."""

    def row() -> dict[str, object] | None:
        found = status_of(jl, name)
        return found if (found[key] if value is None else found[key] == value) else None

    return wait_until(row, timeout, f"status: {name} {key} {value}", interval=0.5)


@pytest.fixture
def notified(jl: Jl, tmp_path: Path) -> Iterator[Path]:
    """A stand-in `notify-send` first on PATH (an edge: what the desktop would show is
    not under test) that records each notification's arguments, one line each."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "notifications"
    fake = bin_dir / "notify-send"
    fake.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {record}\necho >> {record}\n')
    fake.chmod(0o755)
    old = jl.env["PATH"]
    jl.env["PATH"] = f"{bin_dir}:{old}"
    yield record
    jl.env["PATH"] = old


@pytest.fixture
def blocker(cluster: Cluster) -> Iterator[str]:  # noqa: F811
    """A job (root's) that takes the whole node, so the next job pends (Resources)."""
    out = cluster.run(
        "sbatch", "--parsable", "-c", "2", "-t", "10", "-o", "/dev/null", "--wrap", "sleep 600"
    )
    job = out.stdout.strip()
    assert job.isdigit(), out.stderr
    wait_until(lambda: cluster.job_state(job) == "RUNNING", 30, "the blocker to run")
    yield job
    cluster.run("scancel", job)
    wait_until(
        lambda: cluster.job_state(job) in ("CANCELLED", "FORGOTTEN"), 30, "the blocker to go"
    )


def ours(cluster: Cluster) -> list[str]:  # noqa: F811
    """The ids of the test user's jlremote jobs in the queue."""
    return [j["id"] for j in cluster.jobs() if j["name"].startswith("jlremote")]


# ---- the queue -----------------------------------------------------------------------------


@needs_slurm
def test_queued_job_from_no_wait_to_url(
    sjl: Jl,  # noqa: F811
    testbed: Testbed,
    cluster: Cluster,  # noqa: F811
    blocker: str,
    notified: Path,
) -> None:
    t0 = time.monotonic()
    r = sjl("start", ALIAS, "--slurm", "--no-wait", "--notify", "--sbatch", "-t 30", "--json")
    assert r.rc == 0, r.stderr
    assert time.monotonic() - t0 < 15
    queued = r.json()
    job = queued["job_id"]
    assert queued["queued"] and queued["url"] == "" and job.isdigit()
    assert "token" not in r.stderr
    assert ours(cluster) == [job]

    # status: queued, Slurm's reason, and its estimate (the blocker has a time limit).
    row = status_when(sjl, "job_reason", "Resources", 30)
    assert (row["server"], row["tunnel"], row["job_state"], row["url"]) == (
        "queued", "none", "PENDING", ""
    )  # fmt: skip
    row = status_when(sjl, "start_estimate", None, 30)
    text = sjl("status")
    assert "queued (Resources)" in text.stdout and "may start at" in text.stderr

    # The dotfiles alias while it waits: the live line says why; on timeout the job stays.
    rc, out, err = run_under_pty(sjl, "start", ALIAS, "--slurm", "--timeout", "3")
    assert rc == 7 and out == "", err
    assert f"job {job} queued (Resources; estimated start" in err
    assert "it stays queued" in err and not notified.exists()
    assert cluster.job_state(job) == "PENDING"

    # The blocker goes: `wait` prints a working URL; the user is told (the waiter tells).
    assert cluster.run("scancel", blocker).returncode == 0
    w = sjl("wait", ALIAS, "--timeout", "90")
    assert w.rc == 0, w.stderr
    url = w.url
    assert w.stdout.strip() == url and http_get(api(url, "api/status"), token_of(url))[0] == 200
    lines = notified.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"--app-name=jlremote|jlremote: {ALIAS} is ready|"
    )
    assert token_of(url) not in lines[0]

    # `start` again (the alias) attaches: same URL, one job in the queue.
    again = sjl("start", ALIAS, "--slurm", "--json")
    assert again.rc == 0 and again.json()["reused"] and again.json()["url"] == url
    assert ours(cluster) == [job]
    assert status_of(sjl)["server"] == "running"
    assert sjl("stop", ALIAS).rc == 0
    assert ours(cluster) == [] and session_dirs(testbed) == []


@needs_slurm
def test_the_supervisor_finishes_a_queued_start_and_tells(
    sjl: Jl,  # noqa: F811
    testbed: Testbed,
    cluster: Cluster,  # noqa: F811
    blocker: str,
    notified: Path,
) -> None:
    r = sjl("start", ALIAS, "--slurm", "--no-wait", "--notify", "--name", "later")
    assert r.rc == 0 and r.stdout == "", r.stderr
    assert "queued" in r.stderr and "jlremote wait later" in r.stderr
    assert cluster.run("scancel", blocker).returncode == 0
    # Nobody waits: the session's supervisor finishes the start, and tells.
    row = status_when(sjl, "server", "running", 60, name="later")
    assert row["tunnel"] == "up" and row["url"]
    assert http_get(api(str(row["url"]), "api/status"), token_of(str(row["url"])))[0] == 200
    wait_until(notified.exists, 10, "the notification")
    assert "jlremote: later is ready" in notified.read_text()
    again = sjl("start", ALIAS, "--slurm", "--name", "later")
    assert again.rc == 0 and again.url == row["url"]


@needs_slurm
def test_a_queued_job_ended_from_outside_and_a_queued_stop(
    sjl: Jl,  # noqa: F811
    testbed: Testbed,
    cluster: Cluster,  # noqa: F811
    blocker: str,
) -> None:
    r = sjl("start", ALIAS, "--slurm", "--no-wait", "--json")
    assert r.rc == 0, r.stderr
    job = r.json()["job_id"]
    # An admin cancels it while it waits: status says so, with Slurm's word.
    assert cluster.run("scancel", job).returncode == 0
    row = status_when(sjl, "server", "ended", 30)
    assert "cancelled before its server started" in str(row["ended"]), row
    assert "ended: job cancelled before its server started" in sjl("status").stdout
    w = sjl("wait", ALIAS, "--timeout", "5")
    assert w.rc == 7 and w.stdout == ""
    assert_one_error_line(w.stderr, "session 'remote': job cancelled before its server started")
    # `start --no-wait` again queues a new job in its place; `stop` cancels it.
    again = sjl("start", ALIAS, "--slurm", "--no-wait", "--json")
    assert again.rc == 0 and again.json()["job_id"] != job
    assert ours(cluster) == [again.json()["job_id"]]
    # No server yet: `logs` and `open` say so.
    logs = sjl("logs", ALIAS)
    assert logs.rc == 9
    assert_one_error_line(logs.stderr, "no log yet: the job has not started")
    opened = sjl("open", ALIAS)
    assert opened.rc == 7
    assert_one_error_line(opened.stderr, "has no server yet", "jlremote wait")
    stop = sjl("stop", ALIAS)
    assert stop.rc == 0 and stop.stdout == "", stop.stderr
    assert ours(cluster) == [] and cluster.job_state(blocker) == "RUNNING"
    assert sjl.sessions() == {} and session_dirs(testbed) == []


# ---- idle servers and the time limit -------------------------------------------------------


def test_an_idle_server_ends_but_never_under_a_busy_kernel(jl: Jl, testbed: Testbed) -> None:
    r = jl("start", ALIAS, "--idle-timeout", "12s", "--json")
    assert r.rc == 0, r.stderr
    assert r.json()["idle_timeout"] == "12s"
    url = r.json()["url"]
    # A long computation, and nobody connected: the kernel is busy, never culled.
    kernel = new_kernel(url)
    cell = Cell(url, kernel, "import time\nprint('go', flush=True)\ntime.sleep(25)")
    cell.wait_for_output("go")
    cell.ws.close()
    busy_until = time.monotonic() + 22  # the cell's 25 s, less what has passed
    while time.monotonic() < busy_until:
        assert http_get(api(url, "api/status"), token_of(url), timeout=5)[0] == 200
        time.sleep(1)
    # Then idle for 12 s: the server ends, and says why.
    row = status_when(jl, "server", "ended", 40)
    assert row["ended"] == "idle for 12s"
    assert "ended: idle for 12s" in jl("status").stdout
    wait_until(lambda: not jupyter_pids(testbed), 15, "the server (and its kernel) to exit")
    # `start` starts a new one.
    again = jl("start", ALIAS, "--json")
    assert again.rc == 0 and not again.json()["reused"] and again.json()["url"] != url


@needs_slurm
def test_an_idle_job_gives_its_allocation_back(
    sjl: Jl,  # noqa: F811
    testbed: Testbed,
    cluster: Cluster,  # noqa: F811
) -> None:
    r = sjl("start", ALIAS, "--slurm", "--idle-timeout", "10s", "--json")
    assert r.rc == 0, r.stderr
    job = r.json()["job_id"]
    wait_until(lambda: cluster.jobs() == [], 40, "the idle job to leave the queue", interval=1)
    assert cluster.job_state(job) in ("COMPLETED", "FORGOTTEN")
    row = status_of(sjl)
    assert (row["server"], row["ended"]) == ("ended", "idle for 10s")


@needs_slurm
def test_the_time_limit_ends_the_server_cleanly_and_is_announced(
    sjl: Jl,  # noqa: F811
    testbed: Testbed,
    cluster: Cluster,  # noqa: F811
) -> None:
    r = sjl("start", ALIAS, "--slurm", "--sbatch", "-t 2")
    assert r.rc == 0, r.stderr
    job = sjl.sessions()[ALIAS]["server"]["job_id"]
    s = sjl("status")
    assert s.rc == 0 and "!" in s.stdout
    assert f"job {job} reaches its time limit in" in s.stderr
    assert status_of(sjl)["ending_soon"] is True
    # Slurm's warning (60 s ahead, give or take its 30 s tick) stops the server cleanly:
    # the job completes instead of being killed at the limit.
    wait_until(lambda: cluster.jobs() == [], 110, "the job to end", interval=1)
    assert cluster.job_state(job) in ("COMPLETED", "FORGOTTEN")
    log = sjl("logs", ALIAS, "-n", "20").stdout
    assert "received signal 15, stopping" in log and "Shutting down" in log
    row = status_of(sjl)
    assert (row["server"], row["ended"]) == ("ended", "the job reached its time limit")
