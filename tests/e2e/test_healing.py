"""Tunnels that heal and sessions that follow the user: real faults, no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness.cli import Jl, api, http_get, kill_supervisors, token_of
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = pytest.mark.e2e

OUTAGE = 30.0  # seconds the network (or the laptop) is away
RECOVERY = 10.0  # the URL must answer again within this many seconds


def answers(url: str) -> bool:
    return http_get(api(url, "api/status"), token_of(url), timeout=2)[0] == 200


def recovery_time(url: str) -> float:
    """Seconds until the URL answers again (fails the test after RECOVERY)."""
    t0 = time.monotonic()
    wait_until(lambda: answers(url), RECOVERY, "the URL to answer again", interval=0.1)
    took = time.monotonic() - t0
    print(f"recovered in {took:.2f}s")
    return took


def new_kernel(url: str) -> str:
    req = urllib.request.Request(
        api(url, "api/kernels"),
        data=b"{}",
        method="POST",
        headers={"Authorization": f"token {token_of(url)}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as resp:
        return str(json.loads(resp.read())["id"])


def test_killed_tunnel_heals_on_the_same_url(jl: Jl) -> None:
    url = jl("start", ALIAS).url
    old = jl.sessions()[ALIAS]["tunnel"]["pid"]
    os.kill(old, signal.SIGKILL)
    recovery_time(url)
    # (the URL may answer through the new tunnel a moment before that is recorded)
    wait_until(lambda: jl.sessions()[ALIAS]["tunnel"]["pid"] != old, 10, "its record")
    row = jl("status", "--json").json()[0]
    assert row["tunnel"] == "up" and row["server"] == "running" and row["url"] == url
    assert row["last_activity"] and row["uptime_s"] >= 0


def test_sleeping_laptop(jl: Jl) -> None:
    url = jl("start", ALIAS).url
    pid = jl.sessions()[ALIAS]["tunnel"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(OUTAGE)  # the scenario itself: the laptop sleeps this long
    finally:
        os.kill(pid, signal.SIGCONT)
    recovery_time(url)


def test_network_outage_keeps_the_server_and_its_kernels(jl: Jl, testbed: Testbed) -> None:
    if testbed.veth is None:
        pytest.skip("needs the network-namespace test bed (root)")
    url = jl("start", ALIAS).url
    server_pid = jl.sessions()[ALIAS]["server"]["pid"]
    kernel = new_kernel(url)
    # The remote's end of the link goes down: our side keeps its route (no packet of ours
    # leaves for anywhere else), and nothing gets through, as with lost Wi-Fi.
    peer = ["ip", "netns", "exec", testbed.netns or "", "ip", "link", "set", testbed.peer]
    subprocess.run([*peer, "down"], check=True)
    try:
        wait_until(lambda: not answers(url), 10, "the outage to be felt")
        time.sleep(OUTAGE)  # the scenario itself: the network is away this long
        statuses = {r["tunnel"] for r in jl("status", "--offline", "--json").json()}
        assert statuses <= {"reconnecting", "up"}
    finally:
        subprocess.run([*peer, "up"], check=True)
    recovery_time(url)
    assert jl.sessions()[ALIAS]["server"]["pid"] == server_pid
    status, _ = http_get(api(url, f"api/kernels/{kernel}"), token_of(url))
    assert status == 200  # the kernel made before the outage is still there


def test_auth_failure_is_not_retried_and_shows(jl: Jl, testbed: Testbed) -> None:
    assert jl("start", ALIAS).rc == 0
    keys = Path(testbed.workdir) / "authorized_keys" / testbed.user
    saved = keys.read_text()
    keys.write_text("")
    try:
        os.kill(jl.sessions()[ALIAS]["tunnel"]["pid"], signal.SIGKILL)
        wait_until(
            lambda: jl("status", "--offline", "--json").json()[0]["tunnel"] == "failed",
            15,
            "the supervisor to give up",
        )
        row = jl("status", "--offline", "--json").json()[0]
        assert "authentication" in row["tunnel_error"]
        assert row["tunnel_attempts"] == 1
    finally:
        keys.write_text(saved)


def test_second_client_attaches_to_the_same_server(jl: Jl, testbed: Testbed) -> None:
    first = jl("start", ALIAS, "--json").json()
    other_state = Path(tempfile.mkdtemp(prefix="jlr-b-"))
    other_rt = tempfile.mkdtemp(prefix="jlr-", dir="/tmp")
    other = Jl(
        dict(jl.env, JLREMOTE_STATE_DIR=str(other_state), JLREMOTE_RUNTIME_DIR=other_rt),
        other_state,
        Path(other_rt),
    )
    try:
        listed = other("status", "--remote", ALIAS, "--json").json()
        assert [(e["name"], e["server_pid"], e["local"]) for e in listed] == [
            (ALIAS, first["server_pid"], False)
        ]
        second = other("start", ALIAS, "--json").json()
        assert second["attached"] is True
        assert second["server_pid"] == first["server_pid"]
        assert second["url"] != first["url"] and token_of(second["url"]) == token_of(first["url"])
        assert answers(second["url"]) and answers(first["url"])
        assert other("start", ALIAS, "--name", "nothing-here", "--attach").rc == 9
        # Stopping from the second client ends the server; the first sees it gone.
        assert other("stop", ALIAS).rc == 0
        wait_until(lambda: jl("status", "--json").json()[0]["server"] == "gone", 10, "gone")
        assert jl("stop", ALIAS).rc == 0
    finally:
        other("stop", "--all", "--forget", "--grace", "2")
        stray = testbed.kill_local_ssh(marker=other_rt) + kill_supervisors(other_state)
        subprocess.run(["rm", "-rf", str(other_state), other_rt], check=False)
    assert stray == []


def test_parallel_starts_and_stops(jl: Jl, testbed: Testbed) -> None:
    names = [f"p{i}" for i in range(8)]

    def run_all(*argvs: list[str]) -> list[tuple[int, str]]:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "jlremote", *a],
                env=jl.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            for a in argvs
        ]
        return [(p.wait(180), p.stderr.read() if p.stderr else "") for p in procs]

    results = run_all(*[["start", ALIAS, "--name", n] for n in names])
    assert all(rc == 0 for rc, _ in results), results
    rows = jl("status", "--json").json()
    assert sorted(r["name"] for r in rows) == names
    assert {(r["server"], r["tunnel"]) for r in rows} == {("running", "up")}
    assert len({r["server_pid"] for r in rows}) == 8
    results = run_all(*[["stop", n] for n in names])
    assert all(rc == 0 for rc, _ in results), results
    assert jl("status", "--json").json() == []
    assert jl.sessions() == {}
