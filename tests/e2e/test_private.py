"""On a machine shared with other users: nothing jlremote starts can be read, driven or
impersonated by them, and nothing they put there runs as the user. End to end against the
namespace remote, with a second remote account (the eavesdropper, the squatter, the
decoy) and an account whose home directory is 100 characters long."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_start import _fake_jupyter, assert_nothing_left
from tests.harness.cli import Jl, api, http_get, kill_supervisors, token_of
from tests.harness.kernels import EAVESDROPPER, Cell, interrupt, new_kernel, restart, run_cell
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = pytest.mark.e2e

SECRET = "jlr-secret-7f3a9"  # printed by a cell; never seen by another user


def needs_other_users(bed: Testbed) -> None:
    if not bed.other_user:
        pytest.skip("needs root: a second remote account")


def eavesdrop_while(bed: Testbed, tmp_path: Path, action: object) -> dict:  # type: ignore[type-arg]
    """Run the eavesdropper as the other remote user around ACTION(); what it saw."""
    log = tmp_path / "eavesdropper.log"
    ev = bed.remote_popen(["python3", "-c", EAVESDROPPER, SECRET, "6"], log, user=bed.other_user)
    try:
        wait_until(
            lambda: b"READY" in log.read_bytes() or ev.poll() is not None, 30, "the eavesdropper"
        )
        assert ev.poll() is None, log.read_text()
        action()  # type: ignore[operator]
        ev.wait(30)
    finally:
        if ev.poll() is None:
            ev.kill()
            ev.wait()
    return json.loads(log.read_text().splitlines()[-1])  # type: ignore[no-any-return]


def connection_files(bed: Testbed, runtime: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(p.read_text()) for p in runtime.glob("kernel-*.json")]


@pytest.mark.parametrize("transport", ["socket", "tcp"])
def test_kernels_are_private_and_hold_no_token(
    jl: Jl, testbed: Testbed, tmp_path: Path, transport: str
) -> None:
    needs_other_users(testbed)
    r = jl("start", ALIAS, "--transport", transport)
    assert r.rc == 0, r.stderr
    url, token = r.url, token_of(r.url)
    kernel = new_kernel(url)
    run_dir = Path(jl.sessions()[ALIAS]["server"]["session_dir"])
    assert [c["transport"] for c in connection_files(testbed, run_dir)] == ["ipc"]

    replies = []

    def cell() -> None:
        code = (
            "import os, time\n"
            f"print('token in env:', any({token!r} in v for v in os.environ.values()))\n"
            "for i in range(30):\n"
            f"    print({SECRET[:4]!r} + {SECRET[4:]!r}, flush=True); time.sleep(0.1)\n"
        )
        replies.append(run_cell(url, kernel, code))

    seen = eavesdrop_while(testbed, tmp_path, cell)
    assert replies[0].status == "ok" and replies[0].text.count(SECRET) == 30
    assert "token in env: False" in replies[0].text
    # It really listened: every TCP port there (sshd's at least) had a live subscription.
    assert 22 in seen["ports"] and seen["connected"] == len(seen["ports"]), seen
    assert not seen["seen"] and seen["frames"] == 0, seen

    # JupyterLab's other kernel actions still work over IPC.
    busy = Cell(url, kernel, "import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    busy.wait_for_output("sleeping", 30)  # in the user's code: an interrupt reaches it
    interrupt(url, kernel)
    assert busy.wait(30).ename == "KeyboardInterrupt"
    restart(url, kernel)
    assert run_cell(url, kernel, "print(6 * 7)").text == "42\n"


def test_a_100_character_home_works_and_leaves_nothing(jl: Jl, testbed: Testbed) -> None:
    needs_other_users(testbed)
    home = testbed.deep_home
    assert len(home) == 100
    r = jl("start", "remote-deep", "--name", "deep")
    assert r.rc == 0, r.stderr
    record = jl.sessions()["deep"]
    assert record["server"]["sock"]  # the private Unix socket, not the TCP fallback
    run_dir = Path(record["server"]["sock"]).parent
    assert str(run_dir).startswith("/tmp/jlremote-") and len(str(run_dir)) < 30
    st = run_dir.stat()
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == pwd.getpwnam(testbed.deep_user).pw_uid
    kernel = new_kernel(r.url)
    assert run_cell(r.url, kernel, "print('deep ok')").text == "deep ok\n"
    assert [c["transport"] for c in connection_files(testbed, run_dir)] == ["ipc"]

    assert jl("stop", "deep").rc == 0
    assert not run_dir.exists()  # the short directory goes with the session
    sessions = Path(home) / ".jlremote" / "sessions"
    assert list(sessions.iterdir()) == []
    assert testbed.kill_remote_processes() == []
    # doctor tests the socket forward where start would put the socket, and says so.
    doctor = jl("doctor", "remote-deep", "--json")
    assert doctor.rc == 0, doctor.stdout
    checks = {c["name"]: c for c in doctor.json()["checks"]}
    assert checks["socket-forward"]["status"] == "ok"
    assert "too deep for socket paths" in checks["privacy"]["detail"]
    assert list(Path(home, ".jlremote").iterdir()) == [sessions]
    assert not [p for p in Path("/tmp").glob("jlremote-*") if p.stat().st_uid == st.st_uid]


def test_no_code_from_the_working_directory_runs(jl: Jl, testbed: Testbed, tmp_path: Path) -> None:
    """A `jlremote/` folder where the user happens to be (another user's files under
    /tmp, a checkout) is never imported by any process of ours."""
    trap = tmp_path / "shared-dir"
    marker = tmp_path / "pwned"
    package = trap / "jlremote"
    package.mkdir(parents=True)
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    for module in ("__init__.py", "__main__.py", "supervisor.py", "cli.py"):
        (package / module).write_text(payload)
    console_script = Path(sys.executable).parent / "jlremote"
    done = subprocess.run(
        [str(console_script), "start", ALIAS],
        cwd=trap,
        env=jl.env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    # The supervisor, spawned by start, has taken up its work (so it has imported).
    status = jl.state_dir / "supervisors" / f"{ALIAS}.json"
    wait_until(status.exists, 30, "the supervisor to report")
    assert not marker.exists(), marker.read_text()


def _serve_anything(bed: Testbed, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The other user listens on PORT of the remote's loopback, answers 200 to anything
    and writes down every request line and header it gets."""
    code = (
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        sys.stdout.write(self.requestline + '\\n' + str(self.headers))\n"
        "        sys.stdout.flush()\n"
        "        self.send_response(200); self.send_header('Content-Type', 'application/json')\n"
        "        self.end_headers(); self.wfile.write(b'{}')\n"
        "    do_POST = do_GET\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"
    )
    squatter = bed.remote_popen(["python3", "-u", "-c", code], log, user=bed.other_user)
    wait_until(lambda: f"127.0.0.1:{port} " in bed.listening(), 30, "the squatter to listen")
    return squatter


@contextlib.contextmanager
def squatted_session(jl: Jl, bed: Testbed, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TCP session whose server has died and whose port another user now holds."""
    r = jl("start", ALIAS, "--transport", "tcp")
    assert r.rc == 0, r.stderr
    server = jl.sessions()[ALIAS]["server"]
    os.kill(server["pid"], signal.SIGKILL)
    port = server["port"]
    wait_until(lambda: f"127.0.0.1:{port} " not in bed.listening(), 30, "the port to be free")
    log = tmp_path / "squatter.log"
    squatter = _serve_anything(bed, port, log)
    try:
        yield r.url, log
    finally:
        squatter.kill()
        squatter.wait()
        subprocess.run(["pkill", "-KILL", "-u", bed.other_user], check=False)


def test_start_never_hands_a_squatted_port_to_the_browser(
    jl: Jl, testbed: Testbed, tmp_path: Path
) -> None:
    needs_other_users(testbed)
    with squatted_session(jl, testbed, tmp_path) as (old_url, log):
        r = jl("start", ALIAS)  # the dotfiles alias, with the old tunnel still up
        assert r.rc == 0, r.stderr
        assert r.url != old_url
        status, body = http_get(api(r.url, "api/status"), token_of(r.url))
        assert status == 200 and "started" in json.loads(body)  # a real Jupyter
        assert log.read_text() == ""  # not one request (nor the token) reached it


def test_the_supervisor_never_reopens_to_a_squatted_port(
    jl: Jl, testbed: Testbed, tmp_path: Path
) -> None:
    needs_other_users(testbed)
    with squatted_session(jl, testbed, tmp_path) as (old_url, log):
        # The tunnel drops (a network change): the supervisor would re-open it.
        os.kill(jl.sessions()[ALIAS]["tunnel"]["pid"], signal.SIGKILL)

        def given_up() -> bool:
            rows = jl("status", "--json").json()
            return bool(rows) and rows[0]["tunnel"] == "failed"

        wait_until(given_up, 60, "the supervisor to give up", interval=0.5)
        row = jl("status", "--json").json()[0]
        assert row["server"] == "gone" and "gone" in row["tunnel_error"]
        # The session's port is still held (no one else can take it), and says why.
        status, body = http_get(old_url)
        assert status == 503 and b"gave up after 1 attempt(s): the server on" in body, body
        r = jl("start", ALIAS)
        assert r.rc == 0, r.stderr
        assert http_get(api(r.url, "api/status"), token_of(r.url))[0] == 200
        assert log.read_text() == ""


def test_the_users_own_forwardings_and_agent_are_not_taken(
    jl: Jl, testbed: Testbed, tmp_path: Path
) -> None:
    """`LocalForward` to a busy port and `ForwardAgent yes` in the user's config for the
    host: start, repair and stop work, and no connection of ours carries the agent."""
    needs_other_users(testbed)
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(agent_sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    busy = __import__("socket").socket()
    try:
        busy.bind(("127.0.0.1", testbed.busy_port))
        busy.listen()
        wait_until(agent_sock.exists, 10, "ssh-agent")
        env = dict(jl.env, SSH_AUTH_SOCK=str(agent_sock))
        r = jl("start", "remote-fwd", "--name", "fwd", env=env)
        assert r.rc == 0, r.stderr
        server_pid = jl.sessions()["fwd"]["server"]["pid"]
        assert "SSH_AUTH_SOCK" not in psutil.Process(server_pid).environ()
        # Repair: the tunnel's ssh dies, `start` re-opens it on the same port.
        kill_supervisors(jl.state_dir)
        os.kill(jl.sessions()["fwd"]["tunnel"]["pid"], signal.SIGKILL)
        again = jl("start", "remote-fwd", "--name", "fwd", env=env)
        assert again.rc == 0, again.stderr
        assert again.url == r.url
        assert http_get(api(r.url, "api/status"), token_of(r.url))[0] == 200
        uid = pwd.getpwnam(testbed.user).pw_uid
        agents = [p for p in Path("/tmp").glob("ssh-*") if p.stat().st_uid == uid]
        assert agents == []  # sshd made no forwarded-agent socket for any connection of ours
        assert jl("stop", "fwd", env=env).rc == 0
    finally:
        busy.close()
        agent.kill()
        agent.wait()
    assert_nothing_left(testbed, jl)


def test_stop_never_signals_another_users_process(jl: Jl, testbed: Testbed) -> None:
    """A process of another user with our ControlPath in its argv gets no signal and does
    not break `stop`."""
    needs_other_users(testbed)
    r = jl("start", ALIAS)
    assert r.rc == 0, r.stderr
    tunnel = jl.sessions()[ALIAS]["tunnel"]
    kill_supervisors(jl.state_dir)
    os.kill(tunnel["pid"], signal.SIGKILL)  # its control socket stays behind
    wait_until(lambda: not psutil.pid_exists(tunnel["pid"]), 10, "the tunnel to die")
    assert Path(tunnel["control_path"]).exists()
    marker = f"ControlPath={tunnel['control_path']}"
    decoy = subprocess.Popen(
        ["python3", "-c", "import time; time.sleep(120)", "-N", marker],
        user=testbed.other_user,
        start_new_session=True,
    )
    try:
        wait_until(lambda: marker in psutil.Process(decoy.pid).cmdline(), 10, "the decoy")
        done = jl("stop", ALIAS)
        assert done.rc == 0, done.stderr
        assert decoy.poll() is None  # alive: not ours, not touched
    finally:
        decoy.kill()
        decoy.wait()
        subprocess.run(["pkill", "-KILL", "-u", testbed.other_user], check=False)


def test_remote_text_reaches_the_terminal_without_control_sequences(
    jl: Jl, testbed: Testbed
) -> None:
    """A server log (here: of a server that fails) that holds escape sequences: they never
    reach the user's terminal, in the error's detail or from `logs`."""
    fake = _fake_jupyter(
        testbed,
        "noisy-jupyter",
        "printf 'before\\033]0;retitled\\007\\033[2Jafter\\n' >&2\nexit 3",
    )
    r = jl("start", ALIAS, "--jupyter", fake)
    assert r.rc == 7 and "beforeafter" in r.stderr, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert_nothing_left(testbed, jl)
