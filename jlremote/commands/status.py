"""`jlremote status`: each session's server (asked once per host, hosts in parallel) and tunnel."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from jlremote import remote, slurm, ssh, supervision, tunnel
from jlremote import session as lifecycle
from jlremote.errors import ExitCode, JlremoteError
from jlremote.paths import state_dir
from jlremote.results import RemoteRow, StatusRow
from jlremote.state import RemoteServer, Session, StateStore

log = logging.getLogger(__name__)


@dataclass
class _Answers:
    """What the hosts said, together: each server's state by session id (per host), what
    Slurm says of each job, why servers ended, and each host's error."""

    states: dict[str, dict[str, str]] = field(default_factory=dict)
    jobs: dict[str, slurm.JobState] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def status(name: str | None = None, offline: bool = False) -> list[StatusRow]:
    """Rows for all sessions (or just NAME). With `offline`, no remote calls: server unknown."""
    sessions = StateStore(state_dir()).read()
    if name is not None:
        if name not in sessions:
            raise JlremoteError(f"no session named {name!r}", ExitCode.NO_SESSION)
        sessions = {name: sessions[name]}
    said = _Answers() if offline or not sessions else _ask_hosts(list(sessions.values()))
    now = time.time()
    return [_row(s, said, offline, now) for s in sorted(sessions.values(), key=lambda s: s.name)]


def _ask_hosts(sessions: list[Session]) -> _Answers:
    """One probe per host (hosts in parallel); then the sessions whose host's name led
    to another login node than theirs, asked on theirs."""
    by_host: dict[str, list[Session]] = {}
    for s in sessions:
        by_host.setdefault(s.host, []).append(s)
    cfg = ssh.SshConfig.from_environment()
    said = _Answers()

    def ask(host: str) -> tuple[str, remote.Probed | None, str | None]:
        try:
            servers = [s.server for s in by_host[host]]
            wait = cfg.connect_timeout + 10
            return host, remote.probe_jobs(cfg, host, servers, timeout=wait), None
        except JlremoteError as exc:
            return host, None, exc.message

    with ThreadPoolExecutor(max_workers=min(8, len(by_host))) as pool:
        for host, answer, error in pool.map(ask, sorted(by_host)):
            if answer is not None:
                said.states[host] = answer.states
                said.jobs.update(answer.jobs)
                said.ended.update(answer.ended)
            if error is not None:
                said.errors[host] = error
    for s in sessions:
        if said.states.get(s.host, {}).get(s.server.session_id) == "elsewhere":
            try:
                said.states[s.host][s.server.session_id] = lifecycle.probe(cfg, None, s)
            except JlremoteError as exc:
                said.states[s.host].pop(s.server.session_id)
                said.errors.setdefault(s.host, exc.message)
    return said


def _tunnel(s: Session, error: str | None) -> tuple[str, str | None]:
    """The tunnel's state, and the row's error: a port not held by the session is said
    (`port taken` or `down`), and nothing is sent to it."""
    state = lifecycle.tunnel_state(s)
    if state in ("none", "down") or not s.tunnel.local_port or supervision.holds_port(s):
        return state, error
    # Its holder died, and somebody else may have bound it: the token goes nowhere.
    state = _unheld(s.tunnel.local_port)
    return state, error or (
        f"local port {s.tunnel.local_port} is not held by this session"
        + (" (another process listens there)" if state == "port taken" else "")
        + f"; nothing was sent to it; `jlremote start {s.host}` takes it back"
    )


def _row(s: Session, said: _Answers, offline: bool, now: float) -> StatusRow:
    probed = said.states.get(s.host, {}).get(s.server.session_id)
    job = said.jobs.get(s.server.session_id, slurm.JobState())
    error = said.errors.get(s.host)
    if s.server.job_id and s.host in said.states and probed is None:
        error = f"Slurm on {s.host} did not answer about job {s.server.job_id}"
    server, why = _server_state(s, probed, job, said.ended.get(s.server.session_id, ""))
    report = supervision.read_status(s.name)
    state, error = _tunnel(s, error)
    activity = None
    if state == "up" and not offline:
        t = s.tunnel
        api = tunnel.api_status(t.local_port, s.server.base_url, s.token, timeout=2.0)
        activity = str(api["last_activity"]) if api and "last_activity" in api else None
    return StatusRow(
        name=s.name,
        host=s.host,
        url=s.url,
        server=server,
        tunnel=state,
        local_port=s.tunnel.local_port,
        remote_port=s.tunnel.remote_port,
        server_pid=s.server.pid,
        started_at=s.created,
        error=error,
        uptime_s=round(now - s.created, 1),
        transport=("socket" if s.server.sock else "tcp") if s.server.pid else "",
        exposure=exposure(s.server),
        **_retries(report if state not in ("up", "none") else None),
        last_activity=activity,
        **_job_fields(s, job, probed),
        ended=why,
        idle_timeout=s.idle_timeout,
        forwards=lifecycle.apps(s, ask=not offline and state == "up"),
        login_node=s.server.login_name,
        pinned=s.server.pinned,
    )


def _retries(report: supervision.SupervisorStatus | None) -> dict[str, Any]:
    """What the supervisor says of a tunnel that is not up (REPORT; None: it is up)."""
    if report is None:
        return {"tunnel_attempts": 0, "tunnel_error": None, "held": 0}
    return {
        "tunnel_attempts": report.attempts,
        "tunnel_error": report.last_error,
        "held": report.held,
    }


def _job_fields(s: Session, job: slurm.JobState, probed: str | None) -> dict[str, Any]:
    """What Slurm says of S's job (JOB, as PROBED), as the row shows it."""
    return {
        "job_id": s.server.job_id,
        "node": s.server.node or job.node,
        "job_state": job.state if s.server.job_id and probed else "",
        "time_left": job.time_left if job.state == "RUNNING" else "",
        "ending_soon": job.ending_soon and probed == "running",
        "job_reason": job.reason if job.queued else "",
        "start_estimate": job.start if job.queued else "",
    }


def _unheld(port: int) -> str:
    """A session's port that its holder no longer holds: `port taken` (somebody else's
    now) or `down` (free)."""
    return "down" if tunnel.port_is_free(port) else "port taken"


def _server_state(s: Session, probed: str | None, job: slurm.JobState, why: str) -> tuple[str, str]:
    """What STATUS shows as the server (see StatusRow.server), and why it ended if it did
    by itself (the remote's record of it, or for a queued job, Slurm's word)."""
    if s.phase == "ended":
        return "ended", s.ended
    if probed is None:
        return "unknown", ""
    if s.queued:
        if probed == "queued":
            return "queued", ""
        if probed == "running":
            return "starting", ""
        return "ended", slurm.ended_early(job)
    if probed == "running":
        return "running", ""
    if probed == "queued":  # requeued by Slurm: its server is gone for now
        return "queued", ""
    if why:
        return "ended", why
    return "gone", ""


def remote_status(host: str) -> list[RemoteRow]:
    """What jlremote servers of this user run on HOST, started from any client."""
    host = ssh.check_host(host)
    cfg = ssh.SshConfig.from_environment()
    known = {s.server.session_id for s in StateStore(state_dir()).read().values()}
    timeout = cfg.connect_timeout + 15
    entries = remote.list_sessions(cfg, host, timeout)
    # Several login nodes may share one home: the sessions of the others are listed by
    # their own node, reached at the address it was started through.
    others = {e.login_addr for e in entries if not e.here and e.login_addr}
    if others:
        here = [e for e in entries if e.here]
        for addr in sorted(others):
            try:
                there = replace(remote.pinned(cfg, host, addr), control_dir=None)
                found = remote.list_sessions(there, host, timeout)
            except JlremoteError as exc:
                log.warning("could not ask the login node at %s: %s", addr, exc.message)
                found = [e for e in entries if not e.here and e.login_addr == addr]
            here += [e for e in found if e.here or e.login_addr == addr]
        entries = list({e.session_id: e for e in here}.values())
    return [
        RemoteRow(
            host=host,
            name=e.name,
            session_id=e.session_id,
            server_pid=e.pid,
            transport="socket" if e.sock else "tcp",
            notebook=e.kind == "notebook",
            local=e.session_id in known,
            login_node=e.login.split(" ")[0],
        )
        for e in entries
    ]


def exposure(server: RemoteServer) -> str:
    """Who besides the user can connect to SERVER: `private`, `host` or `cluster`."""
    if server.sock:
        return "private"
    return "cluster" if server.job_id else "host"
