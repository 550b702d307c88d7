"""What commands return; cli.py renders these as text or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StartResult:
    """A working session: `url` answered 200 through the tunnel before this was made."""

    name: str
    host: str
    url: str
    local_port: int
    remote_port: int
    server_pid: int
    session_dir: str
    jupyter_server_version: str
    reused: bool
    tunnel_reopened: bool
    transport: str  # socket | tcp
    attached: bool = False  # found running on the remote (started from another client)
    job_id: str = ""  # --slurm: the batch job that runs the server
    node: str = ""  # --slurm: the compute node it runs on
    # --no-wait: the job is queued (no URL yet): Slurm's state, reason and estimated start.
    queued: bool = False
    job_state: str = ""
    job_reason: str = ""
    start_estimate: str = ""
    idle_timeout: str = ""  # --idle-timeout, as a duration (`2h`), "" for none
    # --forward: the session's other apps, each {label, local_port, remote_port, url,
    # target} (target: HOST:PORT as the tunnel's far end reaches it)
    forwards: list[dict[str, object]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StatusRow:
    """One session as `status` sees it."""

    name: str
    host: str
    url: str
    # running | queued (its job waits) | starting (its job runs, the server is coming up)
    # | ended (by itself: `ended` says why) | gone | unknown
    server: str
    tunnel: str  # up | reconnecting | failed | down | none (no server yet)
    local_port: int
    remote_port: int
    server_pid: int
    started_at: float
    error: str | None = None
    uptime_s: float = 0.0
    transport: str = "tcp"
    tunnel_attempts: int = 0  # reconnection attempts so far (tunnel "reconnecting")
    tunnel_error: str | None = None  # why the last attempt failed
    # Connections to the session's port waiting for the tunnel (held by its keeper).
    held: int = 0
    last_activity: str | None = None  # the server's own, from /api/status
    job_id: str = ""  # --slurm: the batch job, its node, its state and walltime left
    node: str = ""
    job_state: str = ""  # e.g. RUNNING, CANCELLED; "" when not known or not a job
    time_left: str = ""  # squeue's %L, e.g. 3:59:58 or UNLIMITED
    ending_soon: bool = False  # under 10 minutes of walltime left
    job_reason: str = ""  # why a queued job waits (Resources, Priority, ...)
    start_estimate: str = ""  # Slurm's estimated start of a queued job, if it has one
    ended: str = ""  # why the server ended by itself: `idle for 2h`, the job's time limit
    idle_timeout: str = ""
    # --forward: as in StartResult, plus `answers` (whether the app answers HTTP now;
    # null when the tunnel is not up or with --offline)
    forwards: list[dict[str, object]] = field(default_factory=list)
    # The login node the server runs on (its host name), and whether HOST's name leads to
    # several, so that every connection for the session goes to that one (pinned).
    login_node: str = ""
    pinned: bool = False
    # Who besides the user can connect to the server (the token still guards it):
    # private (a 0600 Unix socket), host (users of the remote host: its 127.0.0.1),
    # cluster (users of the cluster: a job's server on its node's address).
    exposure: str = "private"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RemoteRow:
    """A jlremote server found running on a remote (from any client)."""

    host: str
    name: str
    session_id: str
    server_pid: int
    transport: str  # socket | tcp
    notebook: bool
    local: bool  # this machine has a session recorded for it
    login_node: str = ""  # the login node it runs on (several may share one home)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StopResult:
    """What `stop` did for one session."""

    name: str
    host: str
    server: str  # stopped | killed | gone | foreign | unknown
    tunnel: str  # closed | down
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """One line of `doctor`: what was checked, how it went, and what to do about it."""

    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""
    required: bool = True  # `start` cannot work while this fails
    seconds: float | None = None  # how long it took, where that matters (connecting)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DoctorResult:
    """All checks for one host; exit_code is that of the first failed required check."""

    host: str
    checks: list[Check]
    exit_code: int

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "checks": [c.to_json() for c in self.checks],
        }


@dataclass(frozen=True)
class ForwardResult:
    """A session's other apps after `forward` (ADDED: the one it added, if it did)."""

    name: str
    host: str
    forwards: list[dict[str, object]]
    added: dict[str, object] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LogResult:
    """The last lines of a session's server log."""

    name: str
    host: str
    lines: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OpenResult:
    """What `open` handed to the browser: a private local page that redirects to url."""

    name: str
    url: str
    page: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
