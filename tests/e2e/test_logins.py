"""Several login nodes behind one name, with one home directory (#11): `cluster` lands each
new connection on login1 (the test remote) or login2 (its own network, PID and UTS
namespaces, the same home and host key), as round-robin DNS would. Sessions are pinned
to the login node their server runs on: no client, and no login node, ever loses one."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_start import assert_nothing_left, jupyter_pids
from tests.harness.cli import Jl, api, http_get, kill_supervisors, token_of
from tests.harness.logins import CLUSTER, SecondLogin
from tests.harness.testbed import Testbed, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network and PID namespaces)"),
]


@pytest.fixture(scope="module")
def login2(testbed: Testbed) -> Iterator[SecondLogin]:
    login = SecondLogin.create(testbed)
    try:
        yield login
    finally:
        login.close()


def answers(url: str) -> bool:
    return http_get(api(url, "api/status"), token_of(url), timeout=2)[0] == 200


def second_client(jl: Jl) -> Jl:
    """Another computer of the same user: its own state and runtime directories."""
    state = Path(tempfile.mkdtemp(prefix="jlr-2nd-"))
    runtime = Path(tempfile.mkdtemp(prefix="jlr-", dir="/tmp"))
    env = dict(jl.env, JLREMOTE_STATE_DIR=str(state), JLREMOTE_RUNTIME_DIR=str(runtime))
    return Jl(env, state, runtime)


def forget_client(client: Jl, testbed: Testbed) -> None:
    """That computer goes away (its servers stay): its processes and files here go."""
    kill_supervisors(client.state_dir)
    testbed.kill_local_ssh(marker=str(client.runtime_dir))
    shutil.rmtree(client.state_dir, ignore_errors=True)
    shutil.rmtree(client.runtime_dir, ignore_errors=True)


def row(jl: Jl) -> dict:  # type: ignore[type-arg]
    rows = jl("status", "--json").json()
    assert len(rows) == 1, rows
    return rows[0]  # type: ignore[no-any-return]


LOGIN1 = os.uname().nodename


def test_a_session_stays_with_its_login_node(jl: Jl, testbed: Testbed, login2: SecondLogin) -> None:
    # TCP: on the test bed, unlike on a real cluster, a Unix socket in the shared home is
    # reachable from login2 too (one kernel), so only a TCP port tells the nodes apart:
    # 127.0.0.1 on login2 is another loopback.
    login2.land("1")
    r = jl("start", CLUSTER, "--transport", "tcp")
    assert r.rc == 0, r.stderr
    url = r.url
    assert answers(url)
    first = row(jl)
    assert (first["login_node"], first["server"]) == (LOGIN1, "running")
    pid = jupyter_pids(testbed)
    assert pid

    # From now on the name leads to login2, where PID and socket mean nothing.
    login2.land("2")
    # The tunnel dies: its supervisor re-opens it on login1, on the same local port.
    os.kill(jl.sessions()[CLUSTER]["tunnel"]["pid"], signal.SIGKILL)
    wait_until(lambda: answers(url), 30, "the URL to answer again through login1")
    assert jl.sessions()[CLUSTER]["server"]["pinned"]
    now = row(jl)
    assert (now["server"], now["login_node"], now["pinned"]) == ("running", LOGIN1, True)
    assert now["url"] == url
    assert jl("start", CLUSTER).url == url  # the alias: the same URL, nothing new
    # login2 keeps login1's entry (it cannot judge it) and lists it with its node.
    remote = jl("status", "--remote", CLUSTER, "--json").json()
    assert [(x["name"], x["login_node"]) for x in remote] == [(CLUSTER, LOGIN1)]
    listed = login2.run(["ls", f"{testbed.home}/.jlremote/sessions"]).stdout.split()
    assert len(listed) == 1

    # A second client with nothing recorded, landing on login2, attaches to it on login1.
    other = second_client(jl)
    try:
        r2 = other("start", CLUSTER, "--json")
        assert r2.rc == 0, r2.stderr
        assert r2.json()["attached"] and r2.json()["server_pid"] == first["server_pid"]
        assert answers(r2.json()["url"])
        assert other("stop", "--all").rc == 0  # stops the server, on login1
    finally:
        forget_client(other, testbed)
    wait_until(lambda: not jupyter_pids(testbed), 15, "the server to stop on login1")
    assert row(jl)["server"] == "gone"
    assert jl("stop", CLUSTER).rc == 0
    assert_nothing_left(testbed, jl)


def test_a_server_on_login2_is_found_and_stopped_from_login1(
    jl: Jl, testbed: Testbed, login2: SecondLogin
) -> None:
    """Started where the name alternates (so the tunnel's own connection lands on the
    other node than the server's): the start pins itself; then the name leads to login1."""
    login2.land("alt")
    r = jl("start", CLUSTER, "--json")
    assert r.rc == 0, r.stderr
    url = r.json()["url"]
    assert answers(url)
    node = row(jl)["login_node"]
    assert node in (LOGIN1, login2.hostname)
    login2.land("1" if node == login2.hostname else "2")
    assert row(jl)["server"] == "running"
    logs = jl("logs", CLUSTER, "-n", "5")
    assert logs.rc == 0, logs.stderr
    assert jl("stop", CLUSTER).rc == 0
    wait_until(lambda: not jupyter_pids(testbed), 15, "the server to stop")
    assert not answers(url)
    assert_nothing_left(testbed, jl)


def test_a_name_with_one_node_is_not_pinned(jl: Jl, testbed: Testbed, login2: SecondLogin) -> None:
    login2.land("1")
    assert jl("start", CLUSTER, "--transport", "tcp").rc == 0
    os.kill(jl.sessions()[CLUSTER]["tunnel"]["pid"], signal.SIGKILL)
    url = jl("status", "--json").json()[0]["url"]
    wait_until(lambda: answers(url), 30, "the URL to answer again")
    assert row(jl)["pinned"] is False
    assert jl("stop", CLUSTER).rc == 0
    assert_nothing_left(testbed, jl)


ROUNDS = 6


@pytest.mark.parametrize("transport", ["socket", "tcp"])
def test_rounds_on_a_name_that_lands_anywhere(
    jl: Jl, testbed: Testbed, login2: SecondLogin, transport: str
) -> None:
    """Every connection lands on a login node at random: sessions on both nodes are
    started, listed, attached to from an empty client, healed and stopped, round after
    round, and nothing is lost, broken or left behind."""
    nodes = set()
    other = second_client(jl)
    try:
        for i in range(ROUNDS):
            login2.land("random")
            names = [f"r{i}a", f"r{i}b"]
            urls = {}
            for name in names:
                r = jl("start", CLUSTER, "--name", name, "--transport", transport)
                assert r.rc == 0, r.stderr
                urls[name] = r.url
            rows = {x["name"]: x for x in jl("status", "--json").json()}
            seen = {n: (rows[n]["server"], rows[n]["error"], rows[n]["login_node"]) for n in names}
            assert all(s[0] == "running" for s in seen.values()), seen
            nodes.update(rows[n]["login_node"] for n in names)
            listed = jl("status", "--remote", CLUSTER, "--json").json()
            assert sorted(x["name"] for x in listed) == sorted(names), listed
            # Every tunnel killed: each URL comes back, on its own node.
            for name in names:
                os.kill(jl.sessions()[name]["tunnel"]["pid"], signal.SIGKILL)
            for name in names:
                wait_until(lambda u=urls[name]: answers(u), 30, f"{name} to answer again")
            # An empty client attaches to each, wherever it lands.
            for name in names:
                r2 = other("start", CLUSTER, "--name", name, "--json")
                assert r2.rc == 0 and r2.json()["attached"], r2.stderr
                assert answers(r2.json()["url"])
            forget_client(other, testbed)
            other = second_client(jl)
            r = jl("stop", "--all", "--json")
            assert r.rc == 0, r.stderr
            assert {x["server"] for x in r.json()} <= {"stopped", "gone"}
            wait_until(lambda: not jupyter_pids(testbed), 15, "every server to stop")
            assert_nothing_left(testbed, jl)
    finally:
        forget_client(other, testbed)
    print(f"{ROUNDS} rounds, sessions on {sorted(nodes)}")


def test_a_login_node_that_is_down_loses_nothing(
    jl: Jl, testbed: Testbed, login2: SecondLogin
) -> None:
    login2.land("2")
    r = jl("start", CLUSTER, "--transport", "tcp")
    assert r.rc == 0, r.stderr
    url = r.url
    assert row(jl)["login_node"] == login2.hostname
    login2.land("1")
    login2.down()
    try:
        state = row(jl)
        assert state["server"] == "unknown", state
        assert jl("status").stderr  # with the reason, on stderr
        # start (the alias) cannot reach it, says so, and removes nothing.
        again = jl("start", CLUSTER, "--timeout", "5")
        assert again.rc in (4, 10), again.stderr
        assert CLUSTER in jl.sessions()
        listed = testbed.remote_run(["ls", f"{testbed.home}/.jlremote/sessions"]).stdout.split()
        assert len(listed) == 1  # login1 removed nothing of login2's
    finally:
        login2.up()
    wait_until(lambda: row(jl)["server"] == "running", 30, "login2's session to be back")
    assert jl("start", CLUSTER).url == url
    assert answers(url)
    # And while it is down, `stop --forget` still works.
    login2.down()
    try:
        r = jl("stop", CLUSTER, "--forget", "--grace", "1", timeout=120)
        assert r.rc == 0, r.stderr
        assert CLUSTER not in jl.sessions()
    finally:
        login2.up()
    # Its server outlived the record (--forget): still there, on login2; stopped by hand.
    assert jupyter_pids(testbed)
    testbed.kill_remote_processes()
    testbed.remote_run(["rm", "-rf", f"{testbed.home}/.jlremote/sessions"])


def test_a_slurm_session_works_through_any_login_node(
    jl: Jl, testbed: Testbed, login2: SecondLogin
) -> None:
    from tests.harness.slurmbed import Cluster, available

    why = available()
    if why is not None:
        pytest.skip(why)
    cluster = Cluster.create(testbed)
    try:
        login2.land("1")
        r = jl("start", CLUSTER, "--slurm", "--json")
        assert r.rc == 0, r.stderr
        url, job = r.json()["url"], r.json()["job_id"]
        assert answers(url)
        login2.land("2")
        state = row(jl)
        assert (state["server"], state["job_id"], state["pinned"]) == ("running", job, False)
        os.kill(jl.sessions()[CLUSTER]["tunnel"]["pid"], signal.SIGKILL)
        wait_until(lambda: answers(url), 30, "the job's URL to answer again")
        r = jl("stop", CLUSTER, "--json")
        assert r.rc == 0 and r.json()[0]["server"] == "stopped", r.stderr
        wait_until(lambda: not cluster.jobs(), 30, "the job to end")
        assert_nothing_left(testbed, jl)
    finally:
        cluster.close()
