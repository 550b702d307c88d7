"""`jlremote forward`: another web app of a running session (TensorBoard, a dashboard),
forwarded over its tunnel's own connection; or one less (`--remove`); or the list."""

from __future__ import annotations

import logging
from dataclasses import replace

from jlremote import loopback, ssh, tunnel
from jlremote import session as lifecycle
from jlremote.errors import ExitCode, JlremoteError
from jlremote.options import parse_forward
from jlremote.paths import state_dir
from jlremote.results import ForwardResult
from jlremote.state import AppForward, Session, StateStore

log = logging.getLogger(__name__)


def forward(name: str | None, spec: str | None, remove: str | None) -> ForwardResult:
    """Add SPEC (`[LABEL=][LOCAL:]PORT`) to session NAME, or REMOVE one (by its port or
    label), or neither: list them. The result lists the session's forwards after it."""
    if spec is not None and remove is not None:
        raise JlremoteError("give a PORT to forward or --remove, not both", ExitCode.USAGE)
    store = StateStore(state_dir())
    name = store.pick(name).name
    with store.name_lock(name, timeout=60):
        session = store.read().get(name)
        if session is None:
            raise JlremoteError(f"no session named {name!r}", ExitCode.NO_SESSION)
        cfg = lifecycle.config_for(ssh.SshConfig.from_environment(), session)
        added = None
        if spec is not None:
            session, added = _add(cfg, store, session, spec)
        elif remove is not None:
            session = _remove(cfg, store, session, remove)
    return ForwardResult(session.name, session.host, lifecycle.apps(session), added)


def _add(
    cfg: ssh.SshConfig, store: StateStore, session: Session, spec: str
) -> tuple[Session, dict[str, object]]:
    try:
        f = parse_forward(spec)
    except ValueError as exc:
        raise JlremoteError(f"forward: {exc}", ExitCode.USAGE) from None
    for app in session.forwards:
        if app.label == f.label or app.remote_port == f.remote_port:
            raise JlremoteError(
                f"forward: session {session.name!r} already forwards port {app.remote_port} "
                f"as {app.label!r} (--remove it first)",
                ExitCode.USAGE,
            )
    if f.local_port and f.local_port == session.tunnel.local_port:
        raise JlremoteError(
            f"forward: local port {f.local_port} is the session's own", ExitCode.LOCAL_PORT
        )
    if f.local_port:
        tunnel.require_free_port(f.local_port, loopback.app_address())
    forwards = lifecycle.new_apps(cfg, session, [f])
    session = _record(store, session, forwards)
    return session, lifecycle.apps(session)[-1]


def _remove(cfg: ssh.SshConfig, store: StateStore, session: Session, which: str) -> Session:
    gone = [a for a in session.forwards if which in (a.label, str(a.remote_port))]
    if not gone:
        raise JlremoteError(
            f"forward: session {session.name!r} forwards no port or label {which!r}",
            ExitCode.USAGE,
        )
    lifecycle.drop_apps(cfg, session, gone)
    return _record(store, session, tuple(a for a in session.forwards if a not in gone))


def _record(store: StateStore, session: Session, forwards: tuple[AppForward, ...]) -> Session:
    with store.transaction() as sessions:
        current = sessions.get(session.name)
        if current is None:
            raise JlremoteError(f"session {session.name!r} was stopped", ExitCode.NO_SESSION)
        sessions[session.name] = current = replace(current, forwards=forwards)
    return current
