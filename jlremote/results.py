"""What commands return; cli.py renders these as text or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StatusRow:
    """One session as `status` sees it."""

    name: str
    host: str
    url: str
    server: str  # running | gone | unknown
    tunnel: str  # up | down
    local_port: int
    remote_port: int
    server_pid: int
    started_at: float
    error: str | None = None

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
