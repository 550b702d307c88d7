"""`jlremote stop`: the tunnel, then exactly our server on the remote, then the record."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jlremote import session as lifecycle
from jlremote import ssh
from jlremote.errors import ExitCode, JlremoteError
from jlremote.paths import state_dir
from jlremote.results import StopResult
from jlremote.state import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopOutcome:
    """The sessions stopped, and the first failure (the others were still attempted)."""

    results: list[StopResult]
    failure: JlremoteError | None


def stop(
    name: str | None, all_sessions: bool = False, forget: bool = False, grace: float = 10.0
) -> StopOutcome:
    """Stop NAME (or every session with `all_sessions`). With `forget`, a remote that
    cannot be reached does not keep the record."""
    store = StateStore(state_dir())
    if all_sessions:
        names = sorted(store.read())
    else:
        try:
            names = [store.pick(name).name]
        except JlremoteError as exc:
            if exc.code == ExitCode.USAGE:  # several sessions: --all is an answer too
                raise JlremoteError(f"{exc.message} or --all", exc.code) from None
            if name is None:
                raise JlremoteError("no sessions to stop", exc.code) from None
            raise
    if not names:  # `stop --all` with nothing to stop: touch nothing, not even ssh
        return StopOutcome([], None)
    cfg = ssh.SshConfig.from_environment()
    results = []
    failure: JlremoteError | None = None
    for n in names:
        try:
            results.append(_stop_one(cfg, store, n, forget, grace))
        except JlremoteError as exc:
            failure = failure or exc
            log.debug("stopping %s failed: %s", n, exc)
    return StopOutcome(results, failure)


def _stop_one(
    cfg: ssh.SshConfig, store: StateStore, name: str, forget: bool, grace: float
) -> StopResult:
    with store.name_lock(name, timeout=grace + 60):
        session = store.read().get(name)
        if session is None:  # stopped by someone else meanwhile
            raise JlremoteError(f"no session named {name!r}", ExitCode.NO_SESSION)
        closed = lifecycle.close_local(session)
        try:
            server = lifecycle.stop_server(cfg, store, session, grace)
        except JlremoteError as exc:
            if not forget:
                raise JlremoteError(
                    f"{exc.message}; session {name!r} kept (retry, or use --forget to drop it)",
                    exc.code,
                ) from exc
            log.warning("%s; forgetting session %r anyway", exc.message, name)
            server = "unknown"
        if server == "foreign":
            log.warning(
                "session %r: PID %d on %s is another process now; left it alone",
                name,
                session.server.pid,
                session.host,
            )
        lifecycle.forget(cfg, store, name)
        return StopResult(name, session.host, server, "closed" if closed else "down")
