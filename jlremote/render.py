"""Results as the user sees them: text tables and lines, or JSON (cli.py calls these;
nothing else prints)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from jlremote.results import DoctorResult, ForwardResult, RemoteRow, StartResult, StatusRow
from jlremote.terminal import clean


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Aligned columns; the last one is not padded (URLs are long)."""
    lines = [header, *[tuple(clean(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    for row in lines:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        typer.echo("  ".join([*cells, row[-1]]))


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def ago(iso: str | None) -> str:
    """The server's last activity (an ISO time in UTC) as `5m ago`; `-` if unknown."""
    if not iso:
        return "-"
    from datetime import datetime, timezone

    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    return duration(max(0.0, (datetime.now(timezone.utc) - then).total_seconds())) + " ago"


def queued(result: StartResult) -> None:
    """A job queued by `start --no-wait`: its id and state, and what to do next (stderr)."""
    from jlremote.slurm import JobState

    job = JobState(result.job_state, result.job_reason, start=result.start_estimate)
    state = "queued" if job.queued or not job.state else job.state.lower()
    typer.echo(
        f"jlremote: job {result.job_id} {state}{job.notes}; `jlremote wait {result.name}` "
        "prints the URL once it runs",
        err=True,
    )


def apps_started(result: StartResult) -> None:
    """The session's other apps (--forward), one URL each, on stderr: stdout's last line
    stays the Jupyter URL."""
    for app in result.forwards:
        typer.echo(f"jlremote: {app['label']}: {app['url']} (port {app['remote_port']})", err=True)


def _answers(app: dict[str, object]) -> str:
    return {True: "yes", False: "no", None: "-"}[app.get("answers")]  # type: ignore[index]


def apps(rows: list[tuple[str, dict[str, object]]]) -> None:
    """The other apps of sessions, as a table."""
    table(
        ("NAME", "APP", "TARGET", "ANSWERS", "URL"),
        [(name, str(a["label"]), str(a["target"]), _answers(a), str(a["url"])) for name, a in rows],
    )


def forwarded(result: ForwardResult) -> None:
    if result.added is not None:
        typer.echo(str(result.added["url"]))
    elif result.forwards:
        apps([(result.name, a) for a in result.forwards])


def _server(r: StatusRow) -> str:
    if r.server == "ended" and r.ended:
        return f"ended: {r.ended}"
    if r.server == "queued" and r.job_reason:
        return f"queued ({r.job_reason})"
    return r.server


def status(rows: list[StatusRow]) -> None:
    if not rows:
        if sys.stderr.isatty():
            typer.echo("no sessions", err=True)
        return
    jobs = any(r.job_id for r in rows)
    logins = any(r.pinned for r in rows)  # a host whose name leads to several login nodes
    table(
        ("NAME", "HOST")
        + (("LOGIN",) if logins else ())
        + ("SERVER", "TUNNEL", "UPTIME", "ACTIVE")
        + (("JOB", "NODE", "STATE", "LEFT") if jobs else ())
        + ("URL",),
        [_status_cells(r, jobs, logins) for r in rows],
    )
    others = [(r.name, a) for r in rows for a in r.forwards]
    if others:
        typer.echo("")
        apps(others)
    for r in rows:
        for line in _status_notes(r):
            typer.echo(f"jlremote: {r.name}: {line}", err=True)


def _status_cells(r: StatusRow, jobs: bool, logins: bool) -> tuple[str, ...]:
    """One row of the status table (with the LOGIN and the job columns, if shown)."""
    login = (r.login_node or "-",) if logins else ()
    left = (r.time_left + ("!" if r.ending_soon else "")) or "-"
    job = (r.job_id or "-", r.node or "-", r.job_state or "-", left) if jobs else ()
    mid = (_server(r), _tunnel(r), duration(r.uptime_s), ago(r.last_activity))
    return (r.name, r.host, *login, *mid, *job, r.url or "-")


def _status_notes(r: StatusRow) -> list[str]:
    """What is said of a session below the table (on stderr)."""
    notes = []
    if r.start_estimate:
        notes.append(f"job {r.job_id} may start at {r.start_estimate} (Slurm's estimate)")
    if r.ending_soon:
        notes.append(
            f"job {r.job_id} reaches its time limit in {r.time_left}; "
            "save your work (the server then shuts down)"
        )
    if r.error:
        notes.append(r.error)
    if r.tunnel == "needs login":
        again = f"jlremote start {r.host}" + (f" --name {r.name}" if r.name != r.host else "")
        notes.append(
            f"the tunnel needs a new login ({r.host} asks for a password or a code; nothing "
            f"asks in the background): `{again}` asks once and re-opens it on the same port"
        )
    elif r.tunnel_error and r.tunnel != "up":
        notes.append(f"tunnel {r.tunnel} after {r.tunnel_attempts} attempt(s): {r.tunnel_error}")
    return notes


def remote_status(found: list[RemoteRow]) -> None:
    if found:
        table(
            ("NAME", "SESSION", "LOGIN", "PID", "TRANSPORT", "HERE"),
            [
                (
                    r.name,
                    r.session_id,
                    r.login_node or "-",
                    str(r.server_pid or "-"),
                    r.transport,
                    "yes" if r.local else "no",
                )
                for r in found
            ],
        )


def doctor(result: DoctorResult) -> None:
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    width = max(len(c.name) for c in result.checks)
    for c in result.checks:  # (details quote the remote: a version, a path, its stderr)
        typer.echo(f"{marks[c.status]}  {c.name.ljust(width)}  {clean(c.detail)}")
        if c.fix and c.status in ("fail", "warn"):
            typer.echo(f"{' ' * (width + 8)}fix: {clean(c.fix)}")


def settings(rows: list[tuple[str, Any, str]]) -> None:
    table(("KEY", "VALUE", "SOURCE"), [(k, json.dumps(v), src) for k, v, src in rows])


def _tunnel(r: StatusRow) -> str:
    """TUNNEL: its state, the attempts so far, the connections held meanwhile."""
    said = r.tunnel if not r.tunnel_attempts else f"{r.tunnel} ({r.tunnel_attempts})"
    return f"{said}, {r.held} held" if r.held else said
