"""`jlremote wait`: the URL of a session once its queued job runs."""

from __future__ import annotations

from collections.abc import Callable

from jlremote import ssh
from jlremote.commands.start import reuse
from jlremote.errors import ExitCode, JlremoteError
from jlremote.options import StartOptions, validate
from jlremote.paths import state_dir
from jlremote.queued import await_queued
from jlremote.results import StartResult
from jlremote.state import StateStore


def wait(name: str | None, timeout: float | None, progress: Callable[[str], None]) -> StartResult:
    """`jlremote wait`: block until NAME's URL works (its queued job runs), then give it.
    Never starts a server: a session whose server has gone is an error."""
    store = StateStore(state_dir())
    session = store.pick(name)
    name = session.name
    if session.phase != "running":
        await_queued(store, name, timeout, progress)
    cfg = ssh.SshConfig.from_environment()
    opts = validate(
        StartOptions(
            host=session.host, name=name, slurm=bool(session.server.job_id), progress=progress
        )
    )
    with store.name_lock(name, timeout=60):
        current = store.read().get(name)
        if current is None:
            raise JlremoteError(f"session {name!r} was stopped", ExitCode.NO_SESSION)
        reused = reuse(cfg, store, current, opts)
    if reused is None:
        raise JlremoteError(
            f"the server of session {name!r} has ended; `jlremote start {session.host}` "
            "starts a new one",
            ExitCode.SERVER,
        )
    return reused
