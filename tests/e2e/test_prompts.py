"""One login per start on a host that asks for a password (or a one-time code), and never
a prompt from the background (#17): an account of the namespace remote that logs in by
password only, and a recording askpass helper (an edge: it stands for the user typing)
with SSH_ASKPASS_REQUIRE=force."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.e2e.test_slurm import cluster  # noqa: F401 (a fixture)
from tests.harness.cli import Jl, api, http_get, token_of
from tests.harness.slurmbed import Cluster, available
from tests.harness.testbed import Testbed, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def prompts(jl: Jl, testbed: Testbed, tmp_path: Path) -> Path:
    """Every prompt ssh shows goes to the askpass helper, which records it (one line
    each) and answers with the account's password."""
    if not testbed.pw_user:
        pytest.skip("the password account needs the namespace remote (root)")
    record = tmp_path / "prompts"
    helper = tmp_path / "askpass"
    helper.write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$1\" >> {record}\nprintf '%s\\n' '{testbed.pw_password}'\n"
    )
    helper.chmod(0o700)
    jl.env.update(SSH_ASKPASS=str(helper), SSH_ASKPASS_REQUIRE="force")
    return record


def asked(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0


def tunnel_of(jl: Jl) -> str:
    row = jl("status", "pw", "--offline", "--json").json()[0]
    return str(row["tunnel"])


def test_one_prompt_per_start_and_none_from_the_background(jl: Jl, prompts: Path) -> None:
    r = jl("start", "pw")
    assert r.rc == 0, r.stderr
    assert asked(prompts) == 1 and "password" in prompts.read_text()
    url = r.url
    assert http_get(api(url, "api/status"), token_of(url))[0] == 200

    # The tunnel dies: the keeper may not ask; the tunnel waits for a login.
    os.kill(jl.sessions()["pw"]["tunnel"]["pid"], signal.SIGKILL)
    wait_until(lambda: tunnel_of(jl) == "needs login", 60, "status: needs login", interval=0.5)
    assert asked(prompts) == 1
    text = jl("status", "--offline")
    assert "needs login" in text.stdout and "`jlremote start pw` asks once" in text.stderr
    assert asked(prompts) == 1

    # The dotfiles alias asks once and re-opens it, on the same port.
    again = jl("start", "pw")
    assert again.rc == 0 and again.url == url, again.stderr
    assert asked(prompts) == 2
    assert http_get(api(url, "api/status"), token_of(url))[0] == 200
    assert tunnel_of(jl) == "up"
    assert jl("stop", "pw").rc == 0
    assert asked(prompts) <= 3  # stop: at most once more (nothing shared is left)


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_a_queued_job_on_a_password_host_is_finished_by_wait_never_in_the_background(
    jl: Jl,
    testbed: Testbed,
    prompts: Path,
    cluster: Cluster,  # noqa: F811
) -> None:
    out = cluster.run("sbatch", "--parsable", "-c", "2", "-t", "10", "-o", "/dev/null",
                      "--wrap", "sleep 600")  # fmt: skip
    blocker = out.stdout.strip()
    try:
        r = jl("start", "pw", "--slurm", "--no-wait", "--json")
        assert r.rc == 0, r.stderr
        job = r.json()["job_id"]
        assert asked(prompts) == 1
        # Its supervisor may not log in: it says so, and stops trying.
        wait_until(lambda: supervisor_state(jl) == "needs login", 60, "the keeper to need a login")
        assert asked(prompts) == 1
        assert cluster.run("scancel", blocker).returncode == 0
        w = jl("wait", "pw", "--timeout", "120")
        assert w.rc == 0, w.stderr
        assert http_get(api(w.url, "api/status"), token_of(w.url))[0] == 200
        assert 2 <= asked(prompts) <= 3  # with --slurm not yet one (docs/pages/hpc.md)
        assert jl("stop", "pw").rc == 0
        wait_until(lambda: cluster.job_state(job) in ("CANCELLED", "FORGOTTEN"), 30, "the job")
    finally:
        cluster.run("scancel", blocker)
        cluster.run("scancel", "-u", testbed.pw_user)


def supervisor_state(jl: Jl) -> str:
    import json

    path = jl.state_dir / "supervisors" / "pw.json"
    return str(json.loads(path.read_text())["state"]) if path.exists() else ""
