"""`jlremote logs` (the remote server's log) and `jlremote open` (the browser)."""

from __future__ import annotations

import logging

from jlremote import proc, remote, scripts, ssh, supervision
from jlremote import session as lifecycle
from jlremote.errors import ExitCode, JlremoteError
from jlremote.paths import state_dir
from jlremote.results import LogResult, OpenResult
from jlremote.state import StateStore
from jlremote.terminal import clean

log = logging.getLogger(__name__)


def logs(name: str | None, lines: int = 50) -> LogResult:
    """The last LINES lines of the session's server log (one ssh call)."""
    if lines < 0:
        raise JlremoteError("-n must be 0 or more", ExitCode.USAGE)
    store = StateStore(state_dir())
    session = store.pick(name)
    cfg = ssh.SshConfig.from_environment()
    try:
        lines_read = lifecycle.on_login(
            cfg, store, session, lambda c: remote.read_log(c, session.host, session.server, lines)
        )
    except JlremoteError as exc:
        raise JlremoteError(f"{session.name}: {exc.message}", exc.code) from None
    return LogResult(session.name, session.host, lines_read)


def follow(name: str | None, lines: int = 50) -> int:
    """Print the log and then its new lines as they come, until Ctrl-C (exit 130) or the
    session's end (exit 0)."""
    if lines < 0:
        raise JlremoteError("-n must be 0 or more", ExitCode.USAGE)
    store = StateStore(state_dir())
    session = store.pick(name)
    cfg = ssh.SshConfig.from_environment()
    login = remote.identity(session.server).login
    script = scripts.logs(session.server.session_id, lines, follow=True, login=login)

    def run(c: ssh.SshConfig) -> int:
        return proc.stream(ssh.command_argv(c, session.host, script.command()), clean)

    rc = run(lifecycle.config_for(cfg, session))
    if rc == scripts.Rc.ELSEWHERE and not session.server.pinned and session.server.login_addr:
        # The name led to another login node (which printed nothing): the session's one.
        rc = run(lifecycle.config_for(cfg, lifecycle.pin(store, session)))
    if rc == scripts.Rc.NO_ENTRY:
        raise JlremoteError(
            f"{session.name}: the server log is gone (the session has ended)", ExitCode.NO_SESSION
        )
    if rc == 255:
        raise JlremoteError(f"lost the connection to {session.host}", ExitCode.CONNECT)
    return rc


def open_session(name: str | None) -> OpenResult:
    """Hand the session's URL to the browser through a private redirect page."""
    from jlremote.browser import open_url

    session = StateStore(state_dir()).pick(name)
    if session.phase != "running":
        raise JlremoteError(
            f"session {session.name!r} has no server yet (job {session.server.job_id} is "
            f"{session.phase}); `jlremote wait {session.name} --open` opens it once it runs",
            ExitCode.SERVER,
        )
    state = lifecycle.tunnel_state(session)
    if state != "up":
        if state != "reconnecting":
            raise JlremoteError(
                f"the tunnel of session {session.name!r} is down; `jlremote start "
                f"{session.host}` re-opens it (and opens the browser with --open)",
                ExitCode.TUNNEL,
            )
        log.warning("the tunnel of %s is reconnecting; the page loads once it is up", session.name)
    if not supervision.holds_port(session):
        raise JlremoteError(
            f"local port {session.tunnel.local_port} is not held by session {session.name!r} "
            "(another process may listen there): the browser was not opened; "
            f"`jlremote start {session.host}` takes the port back",
            ExitCode.TUNNEL,
        )
    page = open_url(session.name, session.url)
    return OpenResult(session.name, session.url, str(page))
