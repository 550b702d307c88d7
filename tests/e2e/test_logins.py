"""Several login nodes behind one name, with one home directory (#11): `cluster` lands each
new connection on login1 (the test remote) or login2 (its own network, PID and UTS
namespaces, the same home and host key), as round-robin DNS would. Sessions are pinned
to the login node their server runs on: no client, and no login node, ever loses one."""

from __future__ import annotations

import os
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


def row(jl: Jl) -> dict:  # type: ignore[type-arg]
    rows = jl("status", "--json").json()
    assert len(rows) == 1, rows
    return rows[0]  # type: ignore[no-any-return]


LOGIN1 = os.uname().nodename


def test_a_session_stays_with_its_login_node(
    jl: Jl, testbed: Testbed, login2: SecondLogin
) -> None:
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
    state2 = Path(tempfile.mkdtemp(prefix="jlr-2nd-"))
    other = Jl(dict(jl.env, JLREMOTE_STATE_DIR=str(state2)), state2, jl.runtime_dir)
    try:
        r2 = other("start", CLUSTER, "--json")
        assert r2.rc == 0, r2.stderr
        assert r2.json()["attached"] and r2.json()["server_pid"] == first["server_pid"]
        assert answers(r2.json()["url"])
        assert other("stop", "--all").rc == 0  # stops the server, on login1
    finally:
        kill_supervisors(state2)
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


def test_a_name_with_one_node_is_not_pinned(
    jl: Jl, testbed: Testbed, login2: SecondLogin
) -> None:
    login2.land("1")
    assert jl("start", CLUSTER, "--transport", "tcp").rc == 0
    os.kill(jl.sessions()[CLUSTER]["tunnel"]["pid"], signal.SIGKILL)
    url = jl("status", "--json").json()[0]["url"]
    wait_until(lambda: answers(url), 30, "the URL to answer again")
    assert row(jl)["pinned"] is False
    assert jl("stop", CLUSTER).rc == 0
    assert_nothing_left(testbed, jl)
