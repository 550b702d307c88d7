"""A private JupyterLab where there is none (#15), end to end: accounts of the namespace
remote with Debian's python3 and no Jupyter on their PATH, and no route anywhere (the
wheels come from here, through ssh)."""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cli import Jl, api, assert_one_error_line, http_get, token_of
from tests.harness.kernels import new_kernel, run_cell
from tests.harness.testbed import Testbed

pytestmark = pytest.mark.e2e


@pytest.fixture
def bare(jl: Jl, testbed: Testbed, wheel_cache: Path) -> Iterator[tuple[str, str]]:
    """The two bare accounts' homes; the runner uses the module's wheel cache."""
    if len(testbed.bare_users) < 2:
        pytest.skip("the bare accounts need the namespace remote (root)")
    jl.env["XDG_CACHE_HOME"] = str(wheel_cache)
    homes = tuple(pwd.getpwnam(u).pw_dir for u in testbed.bare_users)
    yield homes[0], homes[1]


def lab_of(home: str) -> list[str]:
    lab = Path(home) / ".jlremote" / "lab"
    return sorted(p.name for p in lab.iterdir()) if lab.exists() else []


def complete(home: str) -> list[Path]:
    return sorted((Path(home) / ".jlremote" / "lab").glob("*/ok"))


# A folder the user runs jlremote from (a shared project folder, /tmp) with a `pip`
# package in it: it would run as the user if the local pip were imported from there.


def test_install_runs_no_code_from_the_working_directory(
    jl: Jl, bare: tuple[str, str], tmp_path: Path
) -> None:
    """(First in the module: it fills the wheel cache, so the local pip really runs.)"""
    home, _ = bare
    folder = tmp_path / "shared-project"
    planted = folder / "pip"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-pip-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (planted / "__init__.py").write_text(code)
    (planted / "__main__.py").write_text(code)
    r = jl("install", "bare", "--json", cwd=folder, timeout=900)
    assert not marker.exists(), "a pip/ package in the working directory ran"
    assert r.rc == 0, r.stderr
    assert complete(home)
    assert jl("uninstall", "bare").rc == 0
    assert lab_of(home) == []


def test_a_bare_remote_gets_a_private_jupyterlab(jl: Jl, bare: tuple[str, str]) -> None:
    home, _ = bare
    # In a script (no terminal): no question, exit 6, one line; nothing installed.
    r = jl("start", "bare")
    assert r.rc == 6 and r.stdout == "", r.stderr
    assert_one_error_line(r.stderr, "jupyter not found on bare", "add --install")
    assert lab_of(home) == []

    t0 = time.monotonic()
    r = jl("start", "bare", "--install", "--timeout", "120", "--json")
    first = time.monotonic() - t0
    assert r.rc == 0, r.stderr
    url = r.json()["url"]
    assert run_cell(url, new_kernel(url), "print(6 * 7)").text == "42\n"
    assert "kernel is its own Python" in r.stderr  # and how to use the user's
    [ok] = complete(home)
    assert ok.parent.name.startswith("jupyterlab-") and (ok.parent / "venv").is_dir()
    assert not (ok.parent / "wheels").exists()  # only the venv stays
    stamp = ok.stat().st_mtime
    assert jl("stop", "bare").rc == 0

    # Later starts use it without asking, and install nothing.
    t0 = time.monotonic()
    again = jl("start", "bare", "--json")
    later = time.monotonic() - t0
    assert again.rc == 0, again.stderr
    assert http_get(api(again.json()["url"], "api/status"), token_of(again.json()["url"]))[0] == 200
    assert complete(home) == [ok] and ok.stat().st_mtime == stamp
    print(f"first install + start {first:.1f}s, later start {later:.1f}s")
    assert later < first / 2
    doctor = jl("doctor", "bare", "--json").json()
    checks = {c["name"]: c for c in doctor["checks"]}
    assert checks["jupyter"]["status"] == "ok" and "private" in checks["jupyter"]["detail"]

    # Not removed while a server runs from it; removed after.
    busy = jl("uninstall", "bare")
    assert busy.rc == 6
    assert_one_error_line(busy.stderr, "stop its sessions first")
    assert jl("stop", "bare").rc == 0
    gone = jl("uninstall", "bare")
    assert gone.rc == 0 and gone.stdout == "", gone.stderr
    assert lab_of(home) == [] and jl("uninstall", "bare").rc == 0
    assert jl("start", "bare").rc == 6


def test_a_second_account_reuses_the_wheels_and_its_env_kernel(
    jl: Jl, testbed: Testbed, bare: tuple[str, str], wheel_cache: Path
) -> None:
    _, home = bare
    first = jl("install", "bare", "--json")  # fills the cache if the other test did not
    assert first.rc == 0, first.stderr
    assert jl("uninstall", "bare").rc == 0
    cached = list(wheel_cache.glob("jlremote/wheels/*/complete"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime
    r = jl("install", "bare2", "--json")
    assert r.rc == 0, r.stderr
    done = r.json()
    assert done["cached"] and not done["already"]  # the copy only: nothing downloaded
    assert cached[0].stat().st_mtime == before
    assert done["path"] == str(complete(home)[0].parent)
    assert jl("install", "bare2", "--json").json()["already"]

    # --env names the user's Python, which has ipykernel (no Jupyter): its kernel is the
    # private server's default.
    kenv = Path(home) / "kenv" / "bin"
    kenv.mkdir(parents=True)
    (kenv / "python3").write_text(f'#!/bin/sh\nexec {testbed.remote_venv}/bin/python3 "$@"\n')
    os.chmod(kenv / "python3", 0o755)
    uid = pwd.getpwnam(testbed.bare_users[1]).pw_uid
    for p in (kenv.parent, kenv, kenv / "python3"):
        os.chown(p, uid, uid)
    r = jl("start", "bare2", "--env", 'export PATH="$HOME/kenv/bin:$PATH"', "--json")
    assert r.rc == 0, r.stderr
    url = r.json()["url"]
    status, body = http_get(api(url, "api/kernelspecs"), token_of(url))
    assert status == 200 and json.loads(body)["default"] == "env"
    cell = run_cell(url, new_kernel(url), "import sys; print(sys.executable)")
    assert cell.text.strip() == f"{testbed.remote_venv}/bin/python3"
    assert "its own Python" not in r.stderr


def test_an_interrupted_copy_leaves_nothing_a_start_would_use(
    jl: Jl, bare: tuple[str, str], tmp_path: Path
) -> None:
    _, home = bare
    assert jl("uninstall", "bare2").rc == 0
    # The network breaks in the middle of the copy: an ssh (an edge, not the path under
    # test) that passes on 2 MB of the wheels, then dies.
    cut = tmp_path / "ssh"
    cut.write_text(
        "#!/bin/sh\n"
        'case "$*" in *JLREMOTE-INSTALL-COPY*)\n'
        '  { head -c 2000000; exec sleep 30; } | /usr/bin/ssh "$@" &\n'
        "  s=$!\n  sleep 2\n  kill -9 $s\n  pkill -P $$ sleep\n  exit 255\n"
        "esac\n"
        'exec /usr/bin/ssh "$@"\n'
    )
    cut.chmod(0o755)
    env = dict(jl.env, JLREMOTE_SSH=str(cut))
    r = jl("install", "bare2", env=env)
    assert r.rc != 0 and r.stdout == ""
    assert_one_error_line(r.stderr, "the copy to bare2 was interrupted", "jlremote install bare2")
    assert complete(home) == []
    s = jl("start", "bare2")  # not taken for a working install
    assert s.rc == 6
    assert_one_error_line(s.stderr, "add --install")
    again = jl("install", "bare2")  # and a new attempt works
    assert again.rc == 0, again.stderr
    assert len(complete(home)) == 1


def test_at_a_terminal_start_asks_first(jl: Jl, bare: tuple[str, str]) -> None:
    """stdin and stderr on a terminal: `start` says what it would install and where, and
    asks; `n` installs nothing (exit 6)."""
    import pty
    import select
    import subprocess
    import sys

    home, _ = bare
    assert jl("uninstall", "bare").rc == 0
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jlremote", "start", "bare"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=jl.env,
        text=True,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while b"[y/N]" not in seen:
        assert time.monotonic() < deadline, seen
        if select.select([master], [], [], 1)[0]:
            seen += os.read(master, 4096)
    asked = seen.decode(errors="replace")
    assert "Install a private JupyterLab into ~/.jlremote/lab on bare" in asked
    assert "nothing outside your home" in asked
    os.write(master, b"n\n")
    rest = b""
    while True:
        try:
            chunk = os.read(master, 4096) if select.select([master], [], [], 30)[0] else b""
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        rest += chunk
    os.close(master)
    assert proc.wait(30) == 6
    assert "add --install" in rest.decode(errors="replace")
    assert lab_of(home) == []
