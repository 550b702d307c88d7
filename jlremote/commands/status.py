"""`jlremote status`: each session's server (asked once per host, hosts in parallel) and tunnel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from jlremote import remote, ssh, tunnel
from jlremote.errors import ExitCode, JlremoteError
from jlremote.paths import state_dir
from jlremote.results import StatusRow
from jlremote.state import Session, StateStore


def status(name: str | None = None, offline: bool = False) -> list[StatusRow]:
    """Rows for all sessions (or just NAME). With `offline`, no remote calls: server unknown."""
    sessions = StateStore(state_dir()).read()
    if name is not None:
        if name not in sessions:
            raise JlremoteError(f"no session named {name!r}", ExitCode.NO_SESSION)
        sessions = {name: sessions[name]}
    by_host: dict[str, list[Session]] = {}
    for s in sessions.values():
        by_host.setdefault(s.host, []).append(s)

    answers: dict[str, dict[str, str]] = {}
    errors: dict[str, str] = {}
    if by_host and not offline:
        cfg = ssh.SshConfig.from_environment()

        def ask(host: str) -> tuple[str, dict[str, str] | None, str | None]:
            try:
                servers = [s.server for s in by_host[host]]
                return (
                    host,
                    remote.probe(cfg, host, servers, timeout=cfg.connect_timeout + 10),
                    None,
                )
            except JlremoteError as exc:
                return host, None, exc.message

        with ThreadPoolExecutor(max_workers=min(8, len(by_host))) as pool:
            for host, answer, error in pool.map(ask, sorted(by_host)):
                if answer is not None:
                    answers[host] = answer
                if error is not None:
                    errors[host] = error

    rows = []
    for s in sorted(sessions.values(), key=lambda s: s.name):
        probed = answers.get(s.host, {}).get(s.server.session_id)
        server = "running" if probed == "running" else ("gone" if probed else "unknown")
        rows.append(
            StatusRow(
                name=s.name,
                host=s.host,
                url=s.url,
                server=server,
                tunnel="up" if tunnel.tunnel_process(s.tunnel) is not None else "down",
                local_port=s.tunnel.local_port,
                remote_port=s.tunnel.remote_port,
                server_pid=s.server.pid,
                started_at=s.created,
                error=errors.get(s.host),
            )
        )
    return rows
