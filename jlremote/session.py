"""A session's life on this machine: whether its tunnel is up, taking it down, and the
shared ssh connection that goes with a host's last session."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from jlremote import browser, remote, ssh, supervisor, tunnel
from jlremote.errors import JlremoteError
from jlremote.paths import ensure_private_dir, state_dir
from jlremote.state import Session, StateStore

log = logging.getLogger(__name__)


def tunnel_state(session: Session) -> str:
    """`up` (its ssh runs), `reconnecting` (its supervisor is re-opening it), `failed`
    (the supervisor gave up) or `down`."""
    if tunnel.is_up(session.tunnel):
        return "up"
    if supervisor.of(session).alive():
        return "reconnecting"
    report = supervisor.read_status(session.name)
    if report is not None and report.state == "failed":
        return "failed"
    return "down"


def tunnel_log(name: str) -> Path:
    """Where the ssh of session NAME's tunnel writes."""
    return ensure_private_dir(state_dir() / "logs") / f"{name}.tunnel.log"


def close_local(session: Session) -> bool:
    """Its supervisor (first, or it would re-open the tunnel), then its tunnel; whether
    the tunnel was up."""
    supervisor.stop(session)
    return tunnel.close_tunnel(session.tunnel)


def forget(cfg: ssh.SshConfig, store: StateStore, name: str) -> None:
    """Drop NAME's record and its local files; then, if it was the host's last session,
    jlremote's shared connection to the host."""
    with contextlib.suppress(FileNotFoundError):
        supervisor.status_path(name).unlink()
    browser.remove_page(name)
    with store.transaction() as sessions:
        gone = sessions.pop(name, None)
    if gone is not None:
        release_if_unused(cfg, store, gone.host)


def release_if_unused(cfg: ssh.SshConfig, store: StateStore, host: str) -> None:
    """Close jlremote's shared connection to HOST when no session of it is left."""
    if not any(s.host == host for s in store.read().values()):
        with contextlib.suppress(JlremoteError):
            remote.release(cfg, host)


def end(cfg: ssh.SshConfig, store: StateStore, session: Session, grace: float) -> str:
    """Take SESSION down whole: supervisor, tunnel, exactly its server (or job), record.
    Returns what happened to the server (see remote.stop); raises, keeping the record,
    when the remote cannot be asked."""
    close_local(session)
    state = remote.stop(cfg, session.host, remote.identity(session.server), grace)
    forget(cfg, store, session.name)
    return state
