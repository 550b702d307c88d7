"""Nothing the remote says, and nothing another local user does, turns jlremote against
its user (#23). Each attack end to end, by the attacker it names: the remote account
(what its home says back), another local account (connections, a bound port), a folder
the user runs jlremote from, an app's far end."""

from __future__ import annotations

import os
import pwd
import re
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jlremote import tunnel
from tests.e2e.test_outage import port_of
from tests.harness import browser
from tests.harness.attacker import another_account_floods, another_account_tries
from tests.harness.cli import Jl, api, http_get, token_of
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = pytest.mark.e2e

PYTHON = "/usr/bin/python3"

# A ProxyCommand as users write them: the host name (%h) goes through a local shell.
PROXY = r"""
import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.settimeout(None)
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    os.write(1, data)
"""


def needs_root(testbed: Testbed) -> None:
    if testbed.netns is None or not testbed.other_user:
        pytest.skip("needs the network-namespace test bed and a second account (root)")


# ---- what the remote can make jlremote do -----------------------------------------------


@pytest.fixture
def proxied(testbed: Testbed, jl: Jl, tmp_path: Path) -> Iterator[str]:
    """The host alias `proxied`: the test remote through a ProxyCommand with %h, in a
    copy of the test bed's ssh config that the runner uses from now on."""
    proxy = tmp_path / "proxy.py"
    proxy.write_text(PROXY)
    text = Path(testbed.ssh_config).read_text()
    first = text.split("\nHost ", 1)[0].splitlines()  # the test remote's own block
    keep = [ln for ln in first[1:] if not ln.strip().startswith(("HostName", "Port"))]
    block = [
        "Host proxied",
        f"  HostName {testbed.remote_ip}",
        f"  Port {testbed.port}",
        f"  ProxyCommand {PYTHON} {proxy} %h %p",
        *keep,
    ]
    config = tmp_path / "ssh_config"
    config.write_text(text + "\n" + "\n".join(block) + "\n")
    jl.env["JLREMOTE_SSH_CONFIG"] = str(config)
    yield "proxied"


def plant(testbed: Testbed, session_id: str, name: str, login: str) -> str:
    """As the remote account: a session directory in its home whose `login` file says
    LOGIN (a server on another login node, as another client would have left it)."""
    d = f"{testbed.home}/.jlremote/sessions/{session_id}"
    script = (
        'mkdir -p "$1" && printf "%s\\n" "$2" >"$1/name" && echo lab >"$1/kind" '
        '&& echo 4242 >"$1/server.pid" && printf "%s\\n" "$3" >"$1/login"'
    )
    done = testbed.remote_run(["sh", "-c", script, "plant", d, name, login])
    assert done.returncode == 0, done.stderr
    return d


def test_a_login_address_from_the_remote_never_runs_here(
    jl: Jl, testbed: Testbed, proxied: str, tmp_path: Path
) -> None:
    """The remote account plants registry entries: one whose address is shell text, one
    whose login node's name carries terminal escapes. The client's ssh config runs %h
    through a shell (ProxyCommand). status --remote, start (attach) and status: nothing
    runs here, each entry is refused in one clean line, and nothing is removed."""
    needs_root(testbed)
    pwned = Path(f"/tmp/jlr-pwned-{os.getpid()}")
    pwned.unlink(missing_ok=True)
    bad = plant(testbed, "deadbeef00c0ffee", "planted", f"login9 boot9 x$(>{pwned})")
    shown = plant(testbed, "deadbeef00c0ffef", "shown", "login8\x1b]0;owned\x07 boot8 10.9.9.9")
    try:
        listed = jl("status", "--remote", proxied, "--json")
        assert not pwned.exists(), "a value from the remote ran as a local command"
        assert listed.rc == 0, listed.stderr
        assert listed.json() == []  # neither is shown as a session
        lines = listed.stderr.strip().splitlines()
        assert lines == [
            f"jlremote: session planted: the remote sent a login address jlremote will not "
            f"use ('x$(>{pwned})'); nothing was done with it",
            # (the escapes are shown as text, never sent to the terminal)
            "jlremote: session shown: the remote sent a login node jlremote will not use "
            "('login8\\x1b]0;owned\\x07'); nothing was done with it",
        ], listed.stderr
        assert "\x1b" not in listed.stderr and "\x07" not in listed.stderr

        attach = jl("start", proxied, "--name", "planted", "--no-open")
        assert not pwned.exists()
        assert attach.rc == 11, attach.stderr
        assert attach.stderr.strip().splitlines() == [
            f"jlremote: error: session planted: the remote sent a login address jlremote "
            f"will not use ('x$(>{pwned})'); nothing was done with it"
        ]
        assert jl.sessions() == {}
        # Nothing was removed because of it.
        for d in (bad, shown):
            assert testbed.remote_run(["test", "-f", f"{d}/login"]).returncode == 0
    finally:
        pwned.unlink(missing_ok=True)
        testbed.remote_run(["rm", "-rf", bad, shown])
        # jlremote's shared connection to `proxied` (kept 30 s after a command, by design;
        # no session of it is left for `stop` to close it with)
        testbed.kill_local_ssh(marker=str(jl.runtime_dir))


# ---- what another local user can do -----------------------------------------------------


@pytest.fixture
def soft_limit_1024() -> Iterator[None]:
    """jlremote started with a soft limit of 1,024 open files (its children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_flood_of_idle_connections_cannot_free_the_port(
    jl: Jl, testbed: Testbed, soft_limit_1024: None
) -> None:
    """Another local account opens more idle connections than a soft limit of 1,024
    files allows (2 descriptors each there) while trying to bind the port; meanwhile the
    user runs status and start and loads the URL. The supervisor lives, the port is
    never the attacker's (so the token never reaches it), the URL answers."""
    needs_root(testbed)
    url = jl("start", ALIAS, "--no-open").url
    port = port_of(url)
    sup = jl.sessions()[ALIAS]["supervisor_pid"]
    with another_account_tries(testbed, port), another_account_floods(testbed, port, 900) as n:
        assert n >= 600, n  # (the kernel's backlog takes what is not accepted)
        for _ in range(3):
            status, _ = http_get(api(url, "api/status"), token_of(url), timeout=30)
            assert status == 200
            rows = jl("status", "--json").json()
            assert rows[0]["tunnel"] == "up", rows
            again = jl("start", ALIAS, "--no-open")
            assert again.rc == 0 and again.url == url, again.stderr
        assert jl.sessions()[ALIAS]["supervisor_pid"] == sup
        os.kill(sup, 0)  # alive
    # The flood gone, all of it is as before.
    assert http_get(api(url, "api/status"), token_of(url), timeout=10)[0] == 200
    log = (jl.state_dir / "logs" / f"{ALIAS}.supervisor.log").read_text()
    assert "Traceback" not in log, log[-2000:]


def test_kill_9_of_either_holder_never_frees_the_port(jl: Jl, testbed: Testbed) -> None:
    """`kill -9` of the supervisor (which holds the port and serves it), then of its
    guard, while another local account tries to bind the port all along: it never gets
    it, and the URL answers again within 10 s, with no step of the user's."""
    needs_root(testbed)
    url = jl("start", ALIAS, "--no-open").url
    port = port_of(url)

    def answers() -> bool:
        return http_get(api(url, "api/status"), token_of(url), timeout=2)[0] == 200

    def guard_pid() -> int:
        pid, _ = (jl.state_dir / "supervisors" / f"{ALIAS}.guard").read_text().split()
        return int(pid)

    with another_account_tries(testbed, port):
        for round_ in range(2):
            sup = int(jl.sessions()[ALIAS]["supervisor_pid"])
            os.kill(sup, signal.SIGKILL)
            t0 = time.monotonic()
            wait_until(answers, 10, "the URL to answer again", interval=0.1)
            print(f"round {round_}: answered again {time.monotonic() - t0:.2f}s after kill -9")
            wait_until(
                lambda s=sup: jl.sessions()[ALIAS]["supervisor_pid"] != s, 10, "the new record"
            )
            old_guard = guard_pid()
            os.kill(old_guard, signal.SIGKILL)
            wait_until(lambda g=old_guard: guard_pid() != g, 10, "a new guard")
            assert answers()
        rows = jl("status", "--json").json()
        assert rows[0]["tunnel"] == "up", rows
    assert jl("stop", ALIAS).rc == 0
    wait_until(lambda: tunnel.port_is_free(port), 10, "the port to be let go at stop")


# ---- an app's far end ----------------------------------------------------------------------

# On the remote: an app that writes down the Cookie header of every request it gets.
COOKIE_APP = r"""
import http.server, sys
log = open(sys.argv[1], "a")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        log.write(f"{self.path} cookie={self.headers.get('Cookie', '')}\n"); log.flush()
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print("port", s.server_address[1], flush=True)
s.serve_forever()
"""


def test_an_app_gets_no_cookie_of_jupyters(jl: Jl, testbed: Testbed, tmp_path: Path) -> None:
    """A page of Jupyter's is open in the browser (its login cookie and _xsrf set); then
    the browser loads the session's app, whose remote port another user of the remote
    holds (exposure `host`): that user receives none of Jupyter's cookies."""
    needs_root(testbed)
    if browser.executable() is None:
        pytest.fail("no Chromium: `make test` installs Debian's chromium as root")
    other = testbed.other_user
    log_dir = Path(pwd.getpwnam(other).pw_dir) / f"cookies-{os.getpid()}"
    assert testbed.remote_run(["mkdir", "-p", str(log_dir)], user=other).returncode == 0
    seen = log_dir / "seen.log"
    out = tmp_path / "app.out"
    app = testbed.remote_popen([PYTHON, "-u", "-c", COOKIE_APP, str(seen)], out, user=other)
    page = None
    try:
        port = wait_until(
            lambda: re.search(r"port (\d+)", out.read_text() if out.exists() else ""), 20, "app"
        ).group(1)
        r = jl("start", ALIAS, "--no-open", "--forward", f"app={port}", "--json")
        assert r.rc == 0, r.stderr
        url = r.json()["url"]
        app_url = r.json()["forwards"][0]["url"]
        page = browser.Browser()
        page.goto(url)
        wait_until(
            lambda: "_xsrf" in str(page.js("document.cookie")), 60, "Jupyter's cookies", 0.2
        )
        page.goto(app_url + "seen")
        wait_until(lambda: seen.exists() and "/seen" in seen.read_text(), 30, "the app's log")
        logged = seen.read_text()
        assert "_xsrf" not in logged and "username-" not in logged, logged
        assert "cookie=\n" in logged, logged
    finally:
        if page is not None:
            page.close()
        os.killpg(app.pid, signal.SIGKILL)
        app.wait(10)
        subprocess.run(["rm", "-rf", str(log_dir)], check=False)
