"""More than Jupyter (#14): the session's other web apps forwarded over its tunnel's own
connection, end to end. The apps are `python -m http.server` on the namespace remote
(and, with --slurm, one started inside the job on the compute node)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.test_slurm import cluster, sjl  # noqa: F401 (fixtures)
from tests.harness.cli import Jl, api, assert_one_error_line, http_get, token_of
from tests.harness.slurmbed import Cluster, available
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = pytest.mark.e2e
APPS = "127.0.0.2"  # jlremote.loopback: apps' origin on Linux


@pytest.fixture
def remote_app(testbed: Testbed, tmp_path: Path) -> Iterator[Callable[[], int]]:
    """Start an http.server on the remote's 127.0.0.1 (its own free port); returns the
    port. Every one started is killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        log = tmp_path / f"app{len(started)}.log"
        argv = ["python3", "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"]
        started.append(testbed.remote_popen(argv, log))

        def port() -> int | None:
            found = re.search(r"port (\d+)", log.read_text() if log.exists() else "")
            return int(found.group(1)) if found else None

        return wait_until(port, 20, "the app to listen")

    yield start
    for p in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def answers(url: str) -> bool:
    return http_get(url, timeout=5)[0] == 200


def apps_of(jl: Jl) -> dict[str, dict[str, object]]:
    row = jl("status", "--json").json()[0]
    return {str(a["label"]): a for a in row["forwards"]}


def test_apps_are_forwarded_heal_with_the_tunnel_and_end_with_stop(
    jl: Jl, testbed: Testbed, remote_app: Callable[[], int]
) -> None:
    board, dash = remote_app(), remote_app()
    idle = board + 1 if board + 1 != dash else board + 2  # nothing listens there (yet)
    r = jl("start", ALIAS, "--forward", f"tensorboard={board}", "--forward", str(idle))
    assert r.rc == 0, r.stderr
    url = r.url
    assert r.stdout.strip() == url  # stdout's last (only) line stays the Jupyter URL
    # Served from another origin than Jupyter's (127.0.0.2): no cookie of Jupyter's there.
    said = dict(re.findall(r"jlremote: (\S+): (http://127\.0\.0\.2:\d+/) \(port", r.stderr))
    assert set(said) == {"tensorboard", str(idle)}, r.stderr
    assert answers(said["tensorboard"]) and not answers(said[str(idle)])
    apps = apps_of(jl)
    assert apps["tensorboard"]["target"] == f"127.0.0.1:{board}"
    assert (apps["tensorboard"]["answers"], apps[str(idle)]["answers"]) == (True, False)
    assert apps["tensorboard"]["url"] == said["tensorboard"]

    # One more for the running session, over the same connection: no new ssh.
    tunnel_pid = jl.sessions()[ALIAS]["tunnel"]["pid"]
    before = _ssh_processes(testbed)
    added = jl("forward", ALIAS, f"dash={dash}")
    assert added.rc == 0, added.stderr
    dash_url = added.stdout.strip()
    assert answers(dash_url)
    assert tunnel_pid in before and _ssh_processes(testbed) == before

    # The tunnel dies: Jupyter and every app answer again, on the same ports.
    os.kill(tunnel_pid, signal.SIGKILL)
    wait_until(
        lambda: http_get(api(url, "api/status"), token_of(url), timeout=2)[0] == 200,
        30,
        "Jupyter through the healed tunnel",
        interval=0.2,
    )
    wait_until(lambda: answers(said["tensorboard"]) and answers(dash_url), 10, "the apps")
    # (they may answer through the new tunnel a moment before it is recorded)
    wait_until(lambda: jl.sessions()[ALIAS]["tunnel"]["pid"] != tunnel_pid, 10, "its record")

    # --remove closes its port; the others stay.
    gone = jl("forward", ALIAS, "--remove", "tensorboard")
    assert gone.rc == 0 and gone.stdout == "", gone.stderr
    assert not _listening(_port(said["tensorboard"])) and answers(dash_url)
    listed = jl("forward", ALIAS).stdout
    assert "dash" in listed and "tensorboard" not in listed

    # Bad input: one line, nothing changed.
    before = apps_of(jl)
    with socket.socket() as busy:
        busy.bind((APPS, 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for args, rc, words in (
            (["70000"], 2, "70000 is not a port"),
            ([f"dash={idle + 7}"], 2, "already forwards port"),
            ([str(dash)], 2, "already forwards port"),
            ([f"{taken}:{idle + 9}"], 8, f"local port {taken} is already in use"),
            (["x y"], 2, "not [LABEL=][LOCAL:]PORT"),
        ):
            bad = jl("forward", ALIAS, *args)
            assert bad.rc == rc, (args, bad.stderr)
            assert_one_error_line(bad.stderr, words)
    assert apps_of(jl) == before

    # stop ends them all.
    assert jl("stop", ALIAS).rc == 0
    assert not _listening(_port(dash_url)) and not _listening(_port(said[str(idle)]))


def test_forward_options_are_checked_before_connecting(jl: Jl) -> None:
    for args, rc, words in (
        (["--forward", "0"], 2, "0 is not a port"),
        (["--forward", "a=1", "--forward", "a=2"], 2, "the label 'a' is given twice"),
        (["--forward", "6006", "--forward", "tb=6006"], 2, "port '6006' is given twice"),
    ):
        r = jl("start", _unreachable(), *args)
        assert r.rc == rc, (args, r.stderr)
        assert_one_error_line(r.stderr, words)
    with socket.socket() as busy:
        busy.bind((APPS, 0))
        busy.listen()
        taken = busy.getsockname()[1]
        r = jl("start", _unreachable(), "--forward", f"{taken}:6006")
        assert r.rc == 8, r.stderr
        assert_one_error_line(r.stderr, f"local port {taken} is already in use")
    assert jl.sessions() == {}


def _unreachable() -> str:
    """An address of the test bed's own /24 where nothing listens: never contacted here."""
    return "10.213.255.254"


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_an_app_in_the_job_is_reached_on_its_node(
    sjl: Jl,  # noqa: F811
    testbed: Testbed,
    cluster: Cluster,  # noqa: F811
) -> None:
    with socket.socket() as s:  # a free port on the node's address
        s.bind((cluster.address, 0))
        port = s.getsockname()[1]
    app = f"python3 -m http.server --bind {cluster.address} {port} >/dev/null 2>&1 &"
    r = sjl("start", ALIAS, "--slurm", "--env", app, "--forward", f"web={port}", "--json")
    assert r.rc == 0, r.stderr
    web = {a["label"]: a for a in r.json()["forwards"]}["web"]
    assert web["target"] == f"{cluster.address}:{port}"
    wait_until(lambda: answers(str(web["url"])), 30, "the app in the job")
    assert sjl("stop", ALIAS).rc == 0
    wait_until(lambda: not _listening(int(str(web["local_port"]))), 10, "the forward to end")


def _port(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def _listening(port: int) -> bool:
    """Whether an app's port (on the apps' loopback address) is held."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((APPS, port)) == 0


def _ssh_processes(testbed: Testbed) -> set[int]:
    """The PIDs of the ssh connections to the test remote (not `ssh -O` clients)."""
    import psutil

    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.info["name"] == "ssh" and testbed.ssh_config in cmd and "-O" not in cmd:
            found.add(p.pid)
    return found
