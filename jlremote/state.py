"""The state file: one JSON document of all sessions, 0600, replaced atomically under a lock.

A session is recorded only once its URL has been proven to work. A broken file is moved
aside with a warning and jlremote carries on; a file from a newer jlremote is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jlremote import loopback
from jlremote.errors import ExitCode, JlremoteError, LockBusy
from jlremote.paths import ensure_private_dir
from jlremote.ssh import Target

log = logging.getLogger(__name__)

# 2: Slurm fields (job_id, node, address, remote_host); 3: tunnel.node; 4: server.login,
# login_addr, pinned; 5: phase, ended, notify, tty (a job queued with --no-wait), forwards
SCHEMA_VERSION = 5
STATE_FILE = "sessions.json"


@dataclass(frozen=True)
class RemoteServer:
    """The Jupyter server on the remote, and how to recognise it (pid + start + cmdline)."""

    session_id: str
    pid: int
    started: str
    cmdline: str
    port: int
    base_url: str
    session_dir: str
    notebook: bool = False
    version: str = ""
    sock: str = ""  # the server's Unix socket on the remote (socket transport), else ""
    # A server in a Slurm batch job: the job id, the compute node and the node's address
    # that the tunnel reaches through the login host ("" for a server on HOST itself).
    job_id: str = ""
    node: str = ""
    address: str = ""
    # The login node the server runs on (`NAME BOOT_ID`; "" for a job, or unknown) and the
    # address the client reached it at. PINNED: HOST's name leads to several login nodes,
    # so every connection for this server goes to LOGIN_ADDR (ssh.SshConfig.pin).
    login: str = ""
    login_addr: str = ""
    pinned: bool = False

    @property
    def login_name(self) -> str:
        return self.login.split(" ")[0] if self.login else ""

    @property
    def target(self) -> Target:
        """Where a forward to this server goes, as the remote host sees it."""
        return Target(port=self.port, socket=self.sock, host=self.address)


@dataclass(frozen=True)
class Tunnel:
    """The local ssh process that listens on LOCAL and forwards to the remote port; PID,
    create_time and control_path (in its command line) identify it."""

    local_port: int
    remote_port: int
    pid: int | None = None
    create_time: float | None = None
    # The tunnel's own ssh master; its control socket's path also identifies the process.
    control_path: str = ""
    remote_socket: str = ""  # forward to this remote Unix socket instead of remote_port
    remote_host: str = ""  # forward to this address as seen from HOST ("": its 127.0.0.1)
    # The tunnel's connection ends at this compute node, through HOST ("": at HOST).
    node: str = ""

    @property
    def target(self) -> Target:
        return Target(port=self.remote_port, socket=self.remote_socket, host=self.remote_host)


@dataclass(frozen=True)
class AppForward:
    """Another web app of the session (TensorBoard, a dashboard) forwarded over the
    tunnel's own connection: 127.0.0.1:LOCAL_PORT here to REMOTE_PORT beside the server
    (the remote's loopback, or a job's node)."""

    label: str
    local_port: int
    remote_port: int

    @property
    def url(self) -> str:
        return f"http://{loopback.app_url_host()}:{self.local_port}/"  # not Jupyter's origin


@dataclass(frozen=True)
class Session:
    """One running JupyterLab that jlremote started, as recorded locally."""

    name: str
    host: str
    token: str
    server: RemoteServer
    tunnel: Tunnel
    created: float = field(default_factory=time.time)
    # The process of ours that keeps the tunnel up (PID + create time identify it).
    supervisor_pid: int | None = None
    supervisor_created: float | None = None
    # What `start` was asked for (a canonical string), to notice a different ask later.
    launch_options: str = ""
    # `running` (the URL answered), `queued` (a job submitted with --no-wait: no server
    # and no tunnel yet; its supervisor finishes the start once the job runs) or `ended`
    # (the job ended before its server was up: ENDED says why).
    phase: str = "running"
    ended: str = ""
    # --notify: tell the user when the queued job's server is ready; TTY is the terminal
    # it was queued from (for the bell, where there is no desktop notification).
    notify: bool = False
    tty: str = ""
    forwards: tuple[AppForward, ...] = ()

    @property
    def queued(self) -> bool:
        return self.phase == "queued"

    def app_target(self, remote_port: int) -> Target:
        """Where a forward to REMOTE_PORT beside the server goes, as the tunnel's far end
        sees it: its own loopback (the remote, or the job's node the connection ends at),
        or the job's node's address behind the login host."""
        beside = self.server.address if self.server.job_id and not self.tunnel.node else ""
        return Target(port=remote_port, host=beside)

    @property
    def idle_timeout(self) -> str:
        """--idle-timeout as the session was started with it (`2h`; "" for none)."""
        try:
            shaped = json.loads(self.launch_options or "{}")
        except ValueError:
            return ""
        return str(shaped.get("idle_timeout") or "") if isinstance(shaped, dict) else ""

    @property
    def url(self) -> str:
        """The browser URL, token included ("" while there is no server yet)."""
        if self.phase != "running":
            return ""
        page = "tree" if self.server.notebook else "lab"
        base = (
            self.server.base_url
            if self.server.base_url.endswith("/")
            else (self.server.base_url + "/")
        )
        return f"http://127.0.0.1:{self.tunnel.local_port}{base}{page}?token={self.token}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Session:
        return cls(
            name=str(data["name"]),
            host=str(data["host"]),
            token=str(data["token"]),
            server=RemoteServer(**data["server"]),
            tunnel=Tunnel(**data["tunnel"]),
            created=float(data.get("created", 0.0)),
            supervisor_pid=data.get("supervisor_pid"),
            supervisor_created=data.get("supervisor_created"),
            launch_options=str(data.get("launch_options", "")),
            phase=str(data.get("phase", "running")),
            ended=str(data.get("ended", "")),
            notify=bool(data.get("notify", False)),
            tty=str(data.get("tty", "")),
            forwards=tuple(AppForward(**f) for f in data.get("forwards", ())),
        )


class StateStore:
    """Sessions on disk. Readers need no lock (the file is only ever replaced whole);
    writers take an exclusive lock around read-modify-write."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self._lock_path = directory / (STATE_FILE + ".lock")

    def read(self) -> dict[str, Session]:
        """All recorded sessions by name (empty when there is no file yet)."""
        data = self._load()
        if data is None:
            with self._locked():
                data = self._load(move_aside=True)
        return data or {}

    def pick(self, name: str | None) -> Session:
        """The session NAME, or the only one when NAME is None."""
        sessions = self.read()
        if name is not None:
            if name not in sessions:
                raise JlremoteError(f"no session named {name!r}", ExitCode.NO_SESSION)
            return sessions[name]
        if len(sessions) == 1:
            return next(iter(sessions.values()))
        if not sessions:
            raise JlremoteError("no sessions", ExitCode.NO_SESSION)
        raise JlremoteError(
            f"which session? give a NAME ({', '.join(sorted(sessions))})", ExitCode.USAGE
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Session]]:
        """Yield the sessions for changing in place; written back atomically on exit."""
        with self._locked():
            sessions = self._load(move_aside=True) or {}
            before = dict(sessions)
            yield sessions
            if sessions != before:
                self._write(sessions)

    @contextlib.contextmanager
    def name_lock(self, name: str, timeout: float) -> Iterator[None]:
        """Serialise start/stop of one session name across processes."""
        digest = hashlib.sha256(name.encode()).hexdigest()[:24]
        locks = ensure_private_dir(self.directory / "locks")
        with _flock(locks / f"{digest}.lock", timeout, f"session {name!r}"):
            yield

    @contextlib.contextmanager
    def tunnel_lock(self, name: str, timeout: float) -> Iterator[None]:
        """Serialise the re-opening of NAME's tunnel: its supervisor, or a `start` that
        re-opens it in the foreground (which may ask for a password meanwhile)."""
        digest = hashlib.sha256(name.encode()).hexdigest()[:24]
        locks = ensure_private_dir(self.directory / "locks")
        with _flock(locks / f"{digest}.tunnel.lock", timeout, f"the tunnel of {name!r}"):
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_private_dir(self.directory)
        with _flock(self._lock_path, 30.0, "the state file"):
            yield

    def _load(self, move_aside: bool = False) -> dict[str, Session] | None:
        """Parse the file; None means it is corrupt (moved aside when `move_aside`)."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            version = int(doc.get("version", 0))
            if version > SCHEMA_VERSION:
                raise JlremoteError(
                    f"{self.path} was written by a newer jlremote (schema {version}); "
                    "upgrade jlremote",
                    ExitCode.ERROR,
                )
            return {name: Session.from_dict(entry) for name, entry in doc["sessions"].items()}
        except JlremoteError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            if not move_aside:
                return None
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            log.warning(
                "state file %s was corrupt; moved it to %s and started afresh", self.path, aside
            )
            return {}

    def _write(self, sessions: dict[str, Session]) -> None:
        doc = {
            "version": SCHEMA_VERSION,
            "sessions": {name: s.to_dict() for name, s in sorted(sessions.items())},
        }
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".sessions.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def _flock(path: Path, timeout: float, what: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockBusy(f"timed out waiting for the lock on {what} ({path})") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
