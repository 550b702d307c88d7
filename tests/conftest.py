"""Fixtures: the real test remote (tests/harness/testbed.py) and a runner of the real CLI
(`jl`, against it); `cli`, a runner that needs no remote (no root, no sshd)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cli import Jl, kill_supervisors
from tests.harness.testbed import Testbed


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    bed = Testbed.create()
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture
def jl(testbed: Testbed, tmp_path: Path) -> Iterator[Jl]:
    """A CLI runner against the testbed. Afterwards every session is stopped, and any
    process left on either side fails the test."""
    state = tmp_path / "state"
    runtime = tempfile.mkdtemp(prefix="jlr-", dir="/tmp")  # control sockets want short paths
    env = dict(
        os.environ,
        JLREMOTE_STATE_DIR=str(state),
        JLREMOTE_SSH_CONFIG=testbed.ssh_config,
        JLREMOTE_RUNTIME_DIR=runtime,
    )
    env.pop("DISPLAY", None)
    runner = Jl(env, state, Path(runtime))
    yield runner
    runner("stop", "--all", "--forget", "--grace", "3")
    stray_local = testbed.kill_local_ssh(marker=runtime) + kill_supervisors(state)
    shutil.rmtree(runtime, ignore_errors=True)
    stray_remote = testbed.kill_remote_processes()
    assert not stray_local, "ssh processes left behind: " + "; ".join(
        f"{pid}: {testbed.killed_argv.get(pid, '?')}" for pid in stray_local
    )
    assert not stray_remote, f"remote processes left behind: {stray_remote}"


@pytest.fixture
def cli(tmp_path: Path) -> Jl:
    """A CLI runner with its own state and config, and no remote: for what must fail
    (or answer) before any connection."""
    state = tmp_path / "state"
    env = dict(
        os.environ,
        JLREMOTE_STATE_DIR=str(state),
        JLREMOTE_CONFIG=str(tmp_path / "config.toml"),
        JLREMOTE_RUNTIME_DIR=str(tmp_path / "run"),
        JLREMOTE_SSH_CONFIG=str(tmp_path / "no_ssh_config"),
    )
    env.pop("DISPLAY", None)
    return Jl(env, state, tmp_path / "run")


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One local cache of the private JupyterLab's wheels for the run (XDG_CACHE_HOME):
    the first install fills it, later ones reuse it."""
    return tmp_path_factory.mktemp("cache")
