"""End to end: the real CLI, a real sshd in a separate network namespace, a real JupyterLab."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.harness.cli import Jl, api, assert_one_error_line, http_get, kill_supervisors, token_of
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = pytest.mark.e2e


def jupyter_pids(bed: Testbed) -> list[int]:
    out = []
    for pid in bed.remote_pids():
        try:
            if any(Path(a).name.startswith("jupyter") for a in psutil.Process(pid).cmdline()[:2]):
                out.append(pid)
        except psutil.Error:
            pass
    return out


def assert_nothing_left(bed: Testbed, jl: Jl) -> None:
    left = bed.kill_local_ssh(marker=str(jl.runtime_dir))
    assert left == [], [bed.killed_argv.get(pid, "?") for pid in left]
    assert bed.kill_remote_processes() == []
    assert jl.sessions() == {}
    sessions = Path(bed.home) / ".jlremote" / "sessions"
    assert not sessions.exists() or list(sessions.iterdir()) == []


def test_start_status_stop(jl: Jl, testbed: Testbed) -> None:
    r = jl("start", ALIAS)
    assert r.rc == 0, r.stderr
    url = r.url
    assert url.startswith("http://127.0.0.1:") and "/lab?token=" in url
    token = token_of(url)
    assert http_get(api(url, "api/status"), token)[0] == 200
    assert http_get(api(url, "api/status"))[0] == 403  # the token is really needed
    assert http_get(url)[0] == 200

    rows = jl("status", "--json").json()
    assert [(x["name"], x["host"], x["url"], x["server"], x["tunnel"]) for x in rows] == [
        (ALIAS, ALIAS, url, "running", "up")
    ]
    text = jl("status")
    assert text.rc == 0 and url in text.stdout and "running" in text.stdout

    pid = rows[0]["server_pid"]
    assert jupyter_pids(testbed) == [pid]
    stop = jl("stop", ALIAS)
    assert stop.rc == 0, stop.stderr
    assert stop.stdout == ""  # quiet on success
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert http_get(api(url, "api/status"), token)[0] == 0
    assert jl("status", "--json").json() == []
    assert_nothing_left(testbed, jl)


def test_start_twice_reuses_the_session(jl: Jl, testbed: Testbed) -> None:
    first = jl("start", ALIAS)
    second = jl("start", ALIAS, "--json")
    assert first.rc == second.rc == 0
    data = second.json()
    assert data["url"] == first.url and data["reused"] is True
    assert {"name", "host", "url", "local_port"} <= set(data)
    assert len(jupyter_pids(testbed)) == 1
    assert "other options" not in second.stderr
    third = jl("start", ALIAS, "--dir", "/elsewhere")  # an ask the running one cannot meet
    assert third.rc == 0 and third.url == first.url
    assert "already running with other options" in third.stderr
    assert len(jupyter_pids(testbed)) == 1


def test_start_repairs_a_local_reboot(jl: Jl, testbed: Testbed) -> None:
    """All local PIDs gone (tunnel, supervisor and its guard): `start` gives the same URL
    back."""
    url = jl("start", ALIAS).url
    record = jl.sessions()[ALIAS]
    kill_supervisors(jl.state_dir)  # (the supervisor alone: its guard would bring it back)
    os.kill(record["tunnel"]["pid"], signal.SIGKILL)
    wait_until(lambda: jl("status", "--json").json()[0]["tunnel"] == "down", 10, "tunnel down")
    assert http_get(api(url, "api/status"), token_of(url))[0] == 0
    again = jl("start", ALIAS, "--json").json()
    assert again["url"] == url and again["tunnel_reopened"] is True
    assert http_get(api(url, "api/status"), token_of(url))[0] == 200
    assert len(jupyter_pids(testbed)) == 1
    new = jl.sessions()[ALIAS]
    assert (
        psutil.pid_exists(new["supervisor_pid"])
        and new["supervisor_pid"] != record["supervisor_pid"]
    )


def test_server_killed_from_outside_shows_gone_and_start_replaces_it(
    jl: Jl, testbed: Testbed
) -> None:
    url = jl("start", ALIAS).url
    pid = jl.sessions()[ALIAS]["server"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: jl("status", "--json").json()[0]["server"] == "gone", 10, "gone")
    new = jl("start", ALIAS)
    assert new.rc == 0 and new.url != url
    assert http_get(api(new.url, "api/status"), token_of(new.url))[0] == 200


def test_preferred_port_taken_by_another_jupyter(jl: Jl, testbed: Testbed) -> None:
    other_token = "someone-elses-token"
    other = testbed.remote_popen(
        [
            "env",
            f"JUPYTER_TOKEN={other_token}",
            "jupyter",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            "--port=8888",
            "--port-retries=0",
        ],
        Path(testbed.workdir) / "other-jupyter.log",
    )
    try:
        wait_until(lambda: ":8888 " in testbed.listening(), 30, "the other jupyter on 8888")
        r = jl("start", ALIAS, "--port", "8888", "--json")
        assert r.rc == 0, r.stderr
        data = r.json()
        assert data["remote_port"] != 8888
        assert http_get(api(data["url"], "api/status"), token_of(data["url"]))[0] == 200
        assert jl("stop", ALIAS).rc == 0
        assert other.poll() is None  # the unrelated Jupyter is untouched
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait(10)


def test_two_sessions_on_one_host_and_stop_leaves_strangers_alone(jl: Jl, testbed: Testbed) -> None:
    stranger = testbed.remote_popen(
        ["python3", "-c", "import time; time.sleep(600)"], Path(testbed.workdir) / "s.log"
    )
    try:
        a = jl("start", ALIAS, "--name", "a")
        b = jl("start", ALIAS, "--name", "b")
        assert a.rc == b.rc == 0
        assert a.url != b.url
        assert jl("stop", "a").rc == 0
        assert http_get(api(b.url, "api/status"), token_of(b.url))[0] == 200
        assert [x["name"] for x in jl("status", "--json").json()] == ["b"]
        assert jl("stop", "b").rc == 0
        assert stranger.poll() is None
    finally:
        os.killpg(stranger.pid, signal.SIGKILL)
        stranger.wait(10)


def test_notebook(jl: Jl, testbed: Testbed) -> None:
    r = jl("start", ALIAS, "--notebook", "--json")
    assert r.rc == 0, r.stderr
    data = r.json()
    assert "/tree?token=" in data["url"]
    status, body = http_get(data["url"])
    assert status == 200 and b"notebook" in body.lower()
    # The server really is Notebook, not Lab answering a /tree URL.
    cmdline = psutil.Process(data["server_pid"]).cmdline()
    assert any(Path(a).name == "jupyter-notebook" for a in cmdline), cmdline


def test_dir_becomes_the_served_directory(jl: Jl, testbed: Testbed) -> None:
    testbed.remote_run(["mkdir", "-p", f"{testbed.home}/proj dir"])
    testbed.remote_run(["touch", f"{testbed.home}/proj dir/marker.txt"])
    r = jl("start", ALIAS, "--dir", "~/proj dir")
    assert r.rc == 0, r.stderr
    status, body = http_get(api(r.url, "api/contents"), token_of(r.url))
    assert status == 200 and b"marker.txt" in body


def test_token_in_no_argv_and_not_in_logs(jl: Jl, testbed: Testbed) -> None:
    r = jl("-v", "start", ALIAS)
    assert r.rc == 0
    token = token_of(r.url)
    assert token not in r.stderr  # -v logs argv, never the token
    for p in psutil.process_iter(["cmdline"]):
        assert token not in " ".join(p.info["cmdline"] or [])
    for path in [
        *jl.state_dir.joinpath("logs").iterdir(),
        *Path(jl.sessions()[ALIAS]["server"]["session_dir"]).glob("*.log"),
    ]:
        assert token not in path.read_text(errors="replace"), path
    token_file = Path(jl.sessions()[ALIAS]["server"]["session_dir"]) / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert (jl.state_dir / "sessions.json").stat().st_mode & 0o777 == 0o600


def _local_listeners(port: int) -> list[str]:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def test_tcp_server_and_forward_listen_on_loopback_only(jl: Jl, testbed: Testbed) -> None:
    data = jl("start", ALIAS, "--transport", "tcp", "--json").json()
    assert data["transport"] == "tcp"
    remote = [
        line.split()[3]
        for line in testbed.listening().splitlines()
        if f"pid={data['server_pid']}," in line
    ]
    assert remote == [f"127.0.0.1:{data['remote_port']}"]
    assert _local_listeners(data["local_port"]) == [f"127.0.0.1:{data['local_port']}"]


def test_socket_transport_has_no_remote_port_and_shuts_out_other_users(
    jl: Jl, testbed: Testbed
) -> None:
    data = jl("start", ALIAS, "--json").json()  # auto: socket where it works
    assert data["transport"] == "socket" and data["remote_port"] == 0
    assert f"pid={data['server_pid']}," not in testbed.listening()  # no TCP port at all
    assert _local_listeners(data["local_port"]) == [f"127.0.0.1:{data['local_port']}"]
    sock = Path(data["session_dir"]) / "jupyter.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    url = data["url"]
    assert http_get(api(url, "api/status"), token_of(url))[0] == 200
    if not testbed.other_user:
        pytest.skip("no second remote user without root")
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(type(e).__name__)\n"
        "else:\n    print('connected')\n"
    )
    out = testbed.remote_run(["python3", "-c", probe, str(sock)], user=testbed.other_user)
    assert out.stdout.strip() == "PermissionError", out


def test_tcp_fallback_when_sshd_forbids_socket_forwarding(jl: Jl, testbed: Testbed) -> None:
    r = jl("start", f"{ALIAS}-nosock", "--json")
    assert r.rc == 0, r.stderr
    data = r.json()
    assert data["transport"] == "tcp"
    assert http_get(api(data["url"], "api/status"), token_of(data["url"]))[0] == 200
    assert jupyter_pids(testbed) == [data["server_pid"]]  # the socket attempt left nothing
    forced = jl("start", f"{ALIAS}-nosock", "--name", "forced", "--transport", "socket")
    assert forced.rc == 10
    assert_one_error_line(forced.stderr, "refused the forward")
    assert forced.stderr.count("\n") <= 3
    assert jupyter_pids(testbed) == [data["server_pid"]]


def test_ctrl_c_during_start_leaves_nothing(jl: Jl, testbed: Testbed) -> None:
    p = jl.popen("start", ALIAS)
    wait_until(lambda: jupyter_pids(testbed), 30, "the server to be launched")
    os.killpg(p.pid, signal.SIGINT)
    p.wait(30)
    assert p.returncode != 0
    sessions = Path(testbed.home) / ".jlremote" / "sessions"
    try:
        wait_until(
            lambda: not jupyter_pids(testbed) and not list(sessions.iterdir()),
            20,
            "the half-started server and its files to go",
        )
    except TimeoutError:
        ps = subprocess.run(
            ["ps", "-u", testbed.user, "-o", "pid,ppid,stat,args"], capture_output=True, text=True
        ).stdout
        raise AssertionError(f"{p.stderr.read()}\n{ps}\n{list(sessions.iterdir())}") from None
    assert_nothing_left(testbed, jl)


# ---- bad input: one clear line, a documented exit code, nothing left behind -------------


def test_ssh_missing(jl: Jl, testbed: Testbed, tmp_path: Path) -> None:
    env = dict(jl.env, PATH=str(tmp_path))
    r = jl("start", ALIAS, env=env)
    assert r.rc == 3
    assert_one_error_line(r.stderr, "ssh", "not found")


@pytest.mark.parametrize(
    ("host", "code", "words"),
    [
        ("unreachable", 4, "to unreachable"),  # "timed out" or "no route", by the kernel
        ("refused", 4, "refused"),
        ("noauth", 5, "authentication"),
        ("badkey", 5, "host key"),
    ],
)
def test_connection_failures(jl: Jl, testbed: Testbed, host: str, code: int, words: str) -> None:
    r = jl("start", host, "--timeout", "3")
    assert r.rc == code, r.stderr
    assert_one_error_line(r.stderr, words)
    assert_nothing_left(testbed, jl)


def test_jupyter_not_found_says_how_to_fix_it(jl: Jl, testbed: Testbed) -> None:
    r = jl("start", ALIAS, "--env", "PATH=/usr/bin:/bin")
    assert r.rc == 6
    assert_one_error_line(r.stderr, "not found", "--env", "--jupyter")
    r = jl("start", ALIAS, "--jupyter", "/nonexistent/jupyter")
    assert r.rc == 6
    assert_nothing_left(testbed, jl)


def test_env_snippet_is_used_and_its_failure_reported(jl: Jl, testbed: Testbed) -> None:
    ok = jl("start", ALIAS, "--env", f"PATH=/usr/bin:/bin; . {testbed.remote_venv}/bin/activate")
    assert ok.rc == 0, ok.stderr
    assert jl("stop").rc == 0
    bad = jl("start", ALIAS, "--env", "false")
    assert bad.rc == 6
    assert_one_error_line(bad.stderr, "--env")
    assert_nothing_left(testbed, jl)


def test_missing_remote_dir(jl: Jl, testbed: Testbed) -> None:
    r = jl("start", ALIAS, "--dir", "/no/such/dir")
    assert r.rc == 6
    assert_one_error_line(r.stderr, "/no/such/dir")
    assert_nothing_left(testbed, jl)


def _fake_jupyter(bed: Testbed, name: str, body: str) -> str:
    path = Path(bed.workdir) / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_server_that_never_comes_up_times_out_with_its_log(jl: Jl, testbed: Testbed) -> None:
    fake = _fake_jupyter(testbed, "slow-jupyter", "echo 'still loading extensions'\nexec sleep 600")
    r = jl("start", ALIAS, "--jupyter", fake, "--timeout", "2")
    assert r.rc == 7
    assert_one_error_line(r.stderr, "did not start within 2s")
    assert "still loading extensions" in r.stderr  # the remote log's last lines
    wait_until(lambda: not testbed.remote_pids(), 10, "the slow server to be killed")
    assert_nothing_left(testbed, jl)


def test_server_that_crashes_shows_why(jl: Jl, testbed: Testbed) -> None:
    fake = _fake_jupyter(
        testbed, "broken-jupyter", "echo 'ImportError: no module named boom' >&2\nexit 3"
    )
    r = jl("start", ALIAS, "--jupyter", fake)
    assert r.rc == 7
    assert_one_error_line(r.stderr, "exited")
    assert "no module named boom" in r.stderr
    assert_nothing_left(testbed, jl)


def test_busy_local_port(jl: Jl, testbed: Testbed) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = jl("start", ALIAS, "--local-port", str(port))
    assert r.rc == 8
    assert_one_error_line(r.stderr, str(port))
    assert_nothing_left(testbed, jl)


def test_asked_for_local_port_is_used(jl: Jl) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = jl("start", ALIAS, "--local-port", str(port), "--json")
    assert r.rc == 0 and r.json()["local_port"] == port


def test_corrupt_state_file_is_moved_aside(jl: Jl) -> None:
    jl.state_dir.mkdir(parents=True)
    (jl.state_dir / "sessions.json").write_text('{"version": 1, "sessions": {"x": ')
    r = jl("status")
    assert r.rc == 0
    assert str(jl.state_dir / "sessions.json") in r.stderr and "corrupt" in r.stderr
    assert len(list(jl.state_dir.glob("sessions.json.corrupt-*"))) == 1
    assert jl("start", ALIAS).rc == 0


def test_stop_without_name_when_several(jl: Jl) -> None:
    assert jl("start", ALIAS, "--name", "a").rc == 0
    assert jl("start", ALIAS, "--name", "b").rc == 0
    r = jl("stop")
    assert r.rc == 2
    assert_one_error_line(r.stderr, "--all")
    r = jl("stop", "--all", "--json")
    assert r.rc == 0
    assert sorted(x["name"] for x in r.json()) == ["a", "b"]
    assert all(x["server"] == "stopped" for x in r.json())


def test_users_controlmaster_cannot_take_the_listener(jl: Jl, testbed: Testbed) -> None:
    """With `ControlMaster auto` in the user's config and a master up, the forward still
    belongs to a connection of ours: stop closes the port, the user's master lives on."""
    subprocess.run(
        ["ssh", "-F", testbed.ssh_config, f"{ALIAS}-cm", "true"],
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    user_master = Path(testbed.workdir).glob("user-*")
    sockets = list(user_master)
    assert len(sockets) == 1
    try:
        data = jl("start", f"{ALIAS}-cm", "--json").json()
        url = data["url"]
        assert http_get(api(url, "api/status"), token_of(url))[0] == 200
        assert jl("stop").rc == 0
        assert http_get(api(url, "api/status"), token_of(url))[0] == 0  # port closed
        check = subprocess.run(
            ["ssh", "-F", testbed.ssh_config, "-O", "check", f"{ALIAS}-cm"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert check.returncode == 0, check.stderr  # the user's master is untouched
    finally:
        subprocess.run(
            ["ssh", "-F", testbed.ssh_config, "-O", "exit", f"{ALIAS}-cm"],
            capture_output=True,
            timeout=10,
        )
        testbed.kill_local_ssh(marker=str(sockets[0]) if sockets else None)


def test_control_connection_is_closed_after_the_last_stop(jl: Jl, testbed: Testbed) -> None:
    assert jl("start", ALIAS).rc == 0
    assert jl("status").rc == 0
    masters = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(jl.runtime_dir) in " ".join(p.info["cmdline"] or [])
    ]
    assert masters  # the shared control connection and the tunnel's own
    assert jl("stop").rc == 0
    wait_until(
        lambda: (
            not [
                p
                for p in psutil.process_iter(["cmdline"])
                if str(jl.runtime_dir) in " ".join(p.info["cmdline"] or [])
            ]
        ),
        10,
        "our ssh connections to close",
    )
