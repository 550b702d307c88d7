"""Profiles, doctor, logs, open, progress, --json and completion, through the real CLI
against the namespace test remote."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.test_start import assert_nothing_left
from tests.harness.cli import Jl, api, assert_one_error_line, http_get, kill_supervisors, token_of
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def with_config(jl: Jl, tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return dict(jl.env, JLREMOTE_CONFIG=str(path))


def remote_dir(bed: Testbed, name: str, files: dict[str, str]) -> Path:
    """A directory in the remote user's home, owned by that user."""
    import pwd

    d = Path(bed.home) / name
    d.mkdir(exist_ok=True)
    for file, text in files.items():
        (d / file).write_text(text)
    entry = pwd.getpwnam(bed.user)
    for p in [d, *d.iterdir()]:
        os.chown(p, entry.pw_uid, entry.pw_gid)
    return d


def listing(url: str) -> list[str]:
    status, body = http_get(api(url, "api/contents"), token_of(url))
    assert status == 200
    return sorted(e["name"] for e in json.loads(body)["content"])


def test_a_profile_shapes_start_and_the_command_line_beats_it(
    jl: Jl, testbed: Testbed, tmp_path: Path
) -> None:
    remote_dir(testbed, "proj", {"from-profile.txt": "x"})
    remote_dir(testbed, "other", {"from-cli.txt": "x"})
    env = with_config(
        jl,
        tmp_path,
        f'timeout = 90\n\n[hosts.{ALIAS}]\ndir = "proj"\nenv = "export JLR_FROM=profile"\n\n'
        '[hosts."remote-*"]\nnotebook = true\n',
    )
    r = jl("start", ALIAS, env=env)
    assert r.rc == 0, r.stderr
    assert listing(r.url) == ["from-profile.txt"]  # the profile's dir is the server's root
    r2 = jl("start", "remote-b", "--dir", "other", "--lab", env=env)
    assert r2.rc == 0, r2.stderr
    assert listing(r2.url) == ["from-cli.txt"] and "/lab?" in r2.url  # CLI beats the glob

    shown = jl("config", "show", ALIAS, "--json", env=env).json()
    assert shown["path"] == str(tmp_path / "config.toml") and shown["exists"] is True
    settings = shown["settings"]
    assert settings["dir"] == {"value": "proj", "source": f"{tmp_path}/config.toml [hosts.remote]"}
    assert settings["timeout"] == {"value": 90.0, "source": f"{tmp_path}/config.toml"}
    assert settings["jupyter"] == {"value": "jupyter", "source": "default"}
    glob = jl("config", "show", "remote-b", "--json", env=env).json()["settings"]
    assert glob["notebook"]["source"].endswith("[hosts.remote-*]")
    text = jl("config", "show", ALIAS, env=env).stdout
    assert re.search(r"^dir\s+\"proj\"\s+\S+config.toml \[hosts.remote\]$", text, re.M), text


def test_doctor_passes_on_a_good_host_and_explains_failures(jl: Jl, testbed: Testbed) -> None:
    good = jl("doctor", ALIAS, "--json")
    assert good.rc == 0, good.stdout + good.stderr
    data = good.json()
    assert data["ok"] is True and data["exit_code"] == 0
    checks = {c["name"]: c for c in data["checks"]}
    assert list(checks) == [
        "ssh", "resolve", "connect", "shell", "jupyter", "disk", "sessions",
        "tcp-forward", "socket-forward", "privacy",
    ]  # fmt: skip
    assert all(c["status"] == "ok" for c in checks.values()), checks
    assert "no other user can connect" in checks["privacy"]["detail"]
    assert "kernels talk over Unix sockets" in checks["privacy"]["detail"]
    assert "jupyter_server 2." in checks["jupyter"]["detail"]
    assert "jupyterlab 4." in checks["jupyter"]["detail"]
    assert checks["connect"]["seconds"] > 0
    assert f"{testbed.user}@{testbed.remote_ip} port {testbed.port}" in checks["resolve"]["detail"]
    text = jl("doctor", ALIAS)
    assert text.rc == 0 and re.search(r"^ok\s+jupyter\s+/", text.stdout, re.M), text.stdout

    nosock = jl("doctor", "remote-nosock", "--json")
    assert nosock.rc == 0  # start falls back to TCP: a warning, not a failure
    checks = {c["name"]: c for c in nosock.json()["checks"]}
    assert checks["socket-forward"]["status"] == "warn"
    assert "AllowStreamLocalForwarding" in checks["socket-forward"]["fix"]
    # What is private there and what is not, in one line.
    assert checks["privacy"]["status"] == "warn"
    assert "other users of the host can connect" in checks["privacy"]["detail"]

    noauth = jl("doctor", "noauth")
    assert noauth.rc == 5
    assert re.search(r"^FAIL\s+connect\s+authentication to noauth failed", noauth.stdout, re.M)
    assert "fix: set up a key" in noauth.stdout

    nojupyter = jl("doctor", ALIAS, "--jupyter", "no-such-jupyter", "--json")
    assert nojupyter.rc == 6
    checks = {c["name"]: c for c in nojupyter.json()["checks"]}
    assert checks["jupyter"]["status"] == "fail" and "--env" in checks["jupyter"]["fix"]

    refused = jl("doctor", "refused", "--json")
    assert refused.rc == 4 and refused.json()["checks"][-1]["name"] == "connect"
    assert_nothing_left(testbed, jl)


def test_doctor_counts_running_sessions(jl: Jl, testbed: Testbed) -> None:
    assert jl("start", ALIAS, "--name", "one").rc == 0
    checks = {c["name"]: c for c in jl("doctor", ALIAS, "--json").json()["checks"]}
    assert checks["sessions"]["detail"] == "1 running: one"


def test_logs_show_and_follow_the_server_log(jl: Jl, testbed: Testbed) -> None:
    r = jl("start", ALIAS)
    assert r.rc == 0, r.stderr
    out = jl("logs", "-n", "200")
    assert out.rc == 0 and "ServerApp" in out.stdout and "Jupyter Server" in out.stdout
    assert jl("logs", ALIAS, "--json").json()["lines"][-1] in out.stdout
    assert len(jl("logs", "-n", "3").stdout.splitlines()) == 3

    follower = jl.popen("logs", ALIAS, "-f", "-n", "1")
    assert follower.stdout is not None
    fd = follower.stdout.fileno()

    def read_until(needle: str, seen: str = "") -> str:
        deadline = time.monotonic() + 30
        while needle not in seen:
            assert time.monotonic() < deadline, f"no {needle!r} in 30s: {seen!r}"
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 65536).decode(errors="replace")
        return seen

    try:
        read_until("\n")  # the last line: it follows now
        # Something the server logs now: a new kernel.
        req = urllib.request.Request(
            api(r.url, "api/kernels"),
            data=b"{}",
            method="POST",
            headers={"Authorization": f"token {token_of(r.url)}"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            assert resp.status == 201
        read_until("Kernel started")
    finally:
        os.killpg(follower.pid, signal.SIGINT)  # the user's Ctrl-C
        rc = follower.wait(15)
    assert rc == 130

    # No `tail` stays behind on the remote once the follower is gone.
    def remote_tails() -> list[int]:
        tails = []
        for p in testbed.remote_pids():
            try:
                if b"tail" in Path(f"/proc/{p}/cmdline").read_bytes():
                    tails.append(p)
            except OSError:  # it has just exited
                continue
        return tails

    wait_until(lambda: not remote_tails(), 15, "the remote tail to exit")
    assert jl("logs", "nosuch").rc == 9


def test_open_hands_a_private_page_to_browser(jl: Jl, testbed: Testbed, tmp_path: Path) -> None:
    r = jl("start", ALIAS)
    assert r.rc == 0
    record = tmp_path / "browser-argv"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    browser.chmod(0o755)
    env = dict(jl.env, BROWSER=str(browser))
    opened = jl("open", "--json", env=env)
    assert opened.rc == 0, opened.stderr
    data = opened.json()
    argv = record.read_text()
    assert argv == f"file://{data['page']}\n" and token_of(r.url) not in argv
    page = Path(data["page"])
    assert page.stat().st_mode & 0o777 == 0o600 and r.url in page.read_text()
    assert data["url"] == r.url
    # start --open does the same.
    record.unlink()
    again = jl("start", ALIAS, "--open", env=env)
    assert again.rc == 0 and record.read_text() == argv
    # A tunnel that is down (and not being re-opened) is said, not opened.
    record.unlink()
    kill_supervisors(jl.state_dir)
    os.kill(jl.sessions()[ALIAS]["tunnel"]["pid"], signal.SIGKILL)
    down = jl("open", env=env)
    assert down.rc == 10 and not record.exists()
    assert_one_error_line(down.stderr, "tunnel of session 'remote' is down", "jlremote start")
    # The page holds the token: it goes with the session.
    assert page.exists()
    assert jl("stop", ALIAS).rc == 0
    assert not page.exists()


def run_under_pty(jl: Jl, *args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a terminal (stdout a pipe); returns rc, stdout, stderr."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jlremote", *args],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env=jl.env,
        text=True,
    )
    os.close(slave)
    seen = b""
    while True:
        ready = select.select([master], [], [], 120)[0]
        assert ready, "no output from the CLI for 120s"
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read() if proc.stdout else ""
    return proc.wait(30), out, seen.decode(errors="replace")


def test_progress_line_on_a_terminal_never_on_stdout(jl: Jl, testbed: Testbed) -> None:
    rc, out, err = run_under_pty(jl, "start", ALIAS, "--no-open")
    assert rc == 0, err
    assert out.count("\n") == 1 and out.startswith("http://127.0.0.1:")
    for step in ("connecting to remote", "launching lab", "forwarding", "verifying"):
        assert step in err, err
    assert "\r\x1b[K" in err and err.endswith("\r\x1b[K")  # redrawn in place, then erased
    assert jl("stop").rc == 0
    rc, out, err = run_under_pty(jl, "start", ALIAS, "-q", "--no-open")
    assert rc == 0 and err == "" and out.startswith("http://")
    piped = jl("start", ALIAS)  # stderr not a terminal: no progress either
    assert piped.rc == 0 and piped.stderr == ""


def test_every_command_speaks_json(jl: Jl, testbed: Testbed) -> None:
    started = jl("start", ALIAS, "--json")
    assert started.rc == 0
    assert {"name", "url", "local_port", "reused", "transport"} <= set(started.json())
    for args in (
        ("status", "--json"),
        ("status", "--remote", ALIAS, "--json"),
        ("logs", "--json"),
        ("doctor", ALIAS, "--json"),
        ("config", "show", "--json"),
        ("config", "path", "--json"),
    ):
        r = jl(*args)
        assert r.rc == 0, (args, r.stderr)
        r.json()
    stopped = jl("stop", "--json")
    assert stopped.rc == 0 and stopped.json()[0]["server"] == "stopped"


def test_completion_of_sessions_and_hosts(jl: Jl, testbed: Testbed) -> None:
    assert jl("start", ALIAS, "--name", "alpha").rc == 0

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = dict(
            jl.env,
            _JLREMOTE_COMPLETE="complete_bash",
            COMP_WORDS=line,
            COMP_CWORD=str(len(words) - 1),
        )
        exe = Path(sys.executable).parent / "jlremote"
        done = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=30)
        return done.stdout.split()

    for command in ("stop", "logs", "open", "status"):
        assert complete(f"jlremote {command} a") == ["alpha"]
    assert complete("jlremote start remote-") == sorted(
        ["remote-b", "remote-c", "remote-cm", "remote-fwd", "remote-nosock"]
        + (["remote-deep"] if testbed.deep_user else [])
    )
    assert "noauth" in complete("jlremote doctor ")


def test_readme_quick_start_runs_as_written(jl: Jl, testbed: Testbed) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("\n\n", 2)[1]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands] == [
        ["jlremote", "start"], ["jlremote", "status"], ["jlremote", "stop"],
    ]  # fmt: skip
    exe = str(Path(sys.executable).parent / "jlremote")
    outputs = []
    for command in commands:
        argv = [
            exe if w == "jlremote" else (ALIAS if w == "gpubox" else w) for w in command.split()
        ]
        done = subprocess.run(argv, env=jl.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done.stdout)
    url = outputs[0].strip()
    assert url.startswith("http://127.0.0.1:") and url in outputs[1]
    assert outputs[2] == ""
    assert_nothing_left(testbed, jl)
