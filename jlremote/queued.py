"""A job queued with --no-wait, to the end of its wait.

`start --no-wait` submits the job and records the session as `queued`: no server, no
tunnel yet. Its supervisor waits for the job (asking Slurm every QUEUE_POLL seconds, or
every SQUEUE_INTERVAL while someone waits in `start`/`wait`), finishes the start once it
runs (complete()) and tells the user with --notify; `start` and `wait` wait for that
(await_queued()). Below the commands and the supervisor, which both use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace

from jlremote import remote, slurm, ssh, supervision, tunnel
from jlremote import session as lifecycle
from jlremote.errors import ExitCode, JlremoteError
from jlremote.launch import SQUEUE_INTERVAL, WAIT_TICK, Transaction, await_job, finish, job_progress
from jlremote.options import StartOptions, validate
from jlremote.proc import Owned
from jlremote.state import Session, StateStore

log = logging.getLogger(__name__)

QUEUE_POLL = 10.0


def look(cfg: ssh.SshConfig, session: Session) -> slurm.JobState:
    """What Slurm says of SESSION's job now (PENDING when it cannot tell)."""
    try:
        looked = remote.poll_job(
            cfg, session.host, session.server.session_id, session.server.job_id
        )
    except JlremoteError as exc:
        log.info("could not ask about job %s: %s", session.server.job_id, exc.message)
        return slurm.JobState("PENDING")
    return looked.job or slurm.JobState("PENDING")


def own_tty() -> str:
    """The terminal this command runs on ("" if none): where a bell can reach the user."""
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if stream.isatty():
                return os.ttyname(stream.fileno())
    return ""


def await_queued(
    store: StateStore, name: str, timeout: float | None, progress: Callable[[str], None]
) -> Session:
    """Wait (at most TIMEOUT seconds; None: as long as it takes) until the supervisor of
    NAME's queued job has made it a running session; the job stays queued if it has not.
    The supervisor asks Slurm more often while someone waits here."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen_queued = False
    while True:
        session = store.read().get(name)
        if session is None:
            raise JlremoteError(f"session {name!r} was stopped", ExitCode.NO_SESSION)
        if session.phase == "running":
            if seen_queued and session.notify:
                tell_ready(session, own_tty())
            return session
        job = session.server.job_id
        if session.phase == "ended":
            raise JlremoteError(f"session {name!r}: {session.ended}", ExitCode.SERVER)
        seen_queued = True
        report = supervision.read_status(name)
        if report is not None and report.state == "needs login":
            # The host asks for a password or a code: its supervisor may not; here the
            # user is asked (the job stays queued until it runs, as with the supervisor).
            return _complete_here(store, session, progress, deadline)
        if not supervision.of(session).alive():  # e.g. after a reboot here
            session = lifecycle.supervise(store, session)
        supervision.someone_waits(name)
        said = report.detail if report is not None and report.detail else f"job {job} queued"
        progress(said)
        if deadline is not None and time.monotonic() >= deadline:
            raise _still_queued(name, said, timeout)
        time.sleep(WAIT_TICK)


def _still_queued(name: str, said: str, timeout: float | None) -> JlremoteError:
    after = f", still, after {timeout:g}s" if timeout else ", still"
    return JlremoteError(
        f"{said}{after}; it stays queued: `jlremote wait {name}` gives the URL once it "
        f"runs, `jlremote stop {name}` cancels it",
        ExitCode.SERVER,
    )


def _complete_here(
    store: StateStore,
    session: Session,
    progress: Callable[[str], None],
    deadline: float | None,
) -> Session:
    """Watch a queued job from this process and finish its start once it runs, asking
    for the login its supervisor could not (one; the looks at the job keep jlremote's
    connection open). The job stays queued if DEADLINE comes first; the tunnel keeper is
    started once the session runs."""
    cfg = ssh.SshConfig.from_environment()
    progress(f"connecting to {session.host}")
    remote.warm(cfg, session.host, timeout=cfg.connect_timeout + 15)
    while True:
        job = look(cfg, session)
        if not job.queued:
            return complete(cfg, store, session, supervision.of(session), progress, lambda: True)
        said = job_progress(session.server.job_id, job)
        progress(said)
        if deadline is not None and time.monotonic() >= deadline:
            raise _still_queued(session.name, said, None)
        time.sleep(SQUEUE_INTERVAL)


def complete(
    cfg: ssh.SshConfig,
    store: StateStore,
    queued: Session,
    own: Owned,
    report: Callable[[str], None],
    waiting: Callable[[], bool],
) -> Session:
    """The supervisor OWN finishes the start of the QUEUED session once its job runs: the
    tunnel's connection, the route to the node, the forward, the URL verified, the session
    recorded as running. Raises if the job ended (or cannot be reached yet); the job is
    never cancelled here."""
    server = queued.server
    opts = replace(
        validate(
            StartOptions(
                host=queued.host,
                name=queued.name,
                slurm=True,
                notebook=server.notebook,
                local_port=queued.tunnel.local_port or None,
                notify=queued.notify,
            )
        ),
        progress=report,
    )
    with contextlib.ExitStack() as undo:
        tx = Transaction(cfg, store, opts, undo, session_id=server.session_id, token=queued.token)
        tx.own_master(tunnel.start_master(cfg, tx.host, tx.session_id, tx.logfile))
        tx.sup, tx.local_port = own, queued.tunnel.local_port  # (which holds that port)
        found = await_job(
            tx,
            server.job_id,
            server.session_dir,
            deadline=None,
            squeue_every=lambda: SQUEUE_INTERVAL if waiting() else QUEUE_POLL,
            patient=True,
        )
        return finish(tx, found, queued=queued)


def job_ended(cfg: ssh.SshConfig, session: Session) -> str:
    """Why SESSION's queued job has ended ("": it has not, or Slurm cannot tell)."""
    sid, job = session.server.session_id, session.server.job_id
    try:
        looked = remote.poll_job(cfg, session.host, sid, job)
    except JlremoteError:
        return ""
    if looked.job is None or (looked.job.active and not looked.failed):
        return ""
    if looked.failed:  # the job script's own error (e.g. jupyter not found on the node)
        return remote.job_failure(job, looked).message
    return slurm.ended_early(looked.job)


def tell_ready(session: Session, tty: str) -> None:
    from jlremote import notify

    where = f" on {session.server.node}" if session.server.node else ""
    notify.tell(
        f"jlremote: {session.name} is ready",
        f"job {session.server.job_id} runs{where}: `jlremote start {session.host}` "
        f"or `jlremote open {session.name}`",
        tty,
    )
