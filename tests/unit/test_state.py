"""The state file: records, permissions, atomic replace, locking, corruption."""

from __future__ import annotations

import json
import logging
import multiprocessing
from dataclasses import replace
from pathlib import Path

import pytest

from jlremote.errors import JlremoteError
from jlremote.state import SCHEMA_VERSION, RemoteServer, Session, StateStore, Tunnel


def make(name: str, host: str = "gpubox", notebook: bool = False) -> Session:
    return Session(
        name=name,
        host=host,
        token="t0k",
        server=RemoteServer(
            "0123456789abcdef",
            4242,
            "Wed Nov 25 21:59:26 2026",
            "/v/bin/python3 /v/bin/jupyter-lab",
            40001,
            "/",
            "/home/u/.jlremote/sessions/0123456789abcdef",
            notebook,
            "2.21.1",
        ),
        tunnel=Tunnel(9000, 40001, 777, 1234.5),
        created=1000.0,
    )


def test_url() -> None:
    assert make("a").url == "http://127.0.0.1:9000/lab?token=t0k"
    assert make("a", notebook=True).url == "http://127.0.0.1:9000/tree?token=t0k"


def test_a_queued_session_has_no_url_and_older_records_are_running(tmp_path: Path) -> None:
    queued = replace(make("q"), phase="queued", notify=True, tty="/dev/pts/3")
    assert queued.queued and queued.url == ""
    assert Session.from_dict(queued.to_dict()) == queued
    entry = make("a").to_dict()
    for key in ("phase", "ended", "notify", "tty"):  # a schema 4 record
        del entry[key]
    assert Session.from_dict(entry) == make("a") and make("a").phase == "running"
    shaped = replace(make("a"), launch_options='{"idle_timeout": "2h", "notebook": false}')
    assert shaped.idle_timeout == "2h" and make("a").idle_timeout == ""


def test_round_trip_mode_and_schema(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "st")
    assert store.read() == {}
    with store.transaction() as sessions:
        sessions["a"] = make("a")
    assert store.read() == {"a": make("a")}
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "st").stat().st_mode & 0o777 == 0o700
    doc = json.loads(store.path.read_text())
    assert doc["version"] == SCHEMA_VERSION and doc["sessions"]["a"]["server"]["pid"] == 4242
    assert [p.name for p in (tmp_path / "st").iterdir() if p.name.endswith(".tmp")] == []


def test_a_version_1_file_still_reads(tmp_path: Path) -> None:
    """Schemas 2 and 3 only added fields with defaults (Slurm's, the tunnel's node): older
    records read as before."""
    store = StateStore(tmp_path)
    entry = make("a").to_dict()
    for key in ("job_id", "node", "address"):
        del entry["server"][key]
    del entry["tunnel"]["remote_host"]
    del entry["tunnel"]["node"]
    store.path.write_text(json.dumps({"version": 1, "sessions": {"a": entry}}))
    assert store.read() == {"a": make("a")}


def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path)
    store.path.write_text('{"version": 1, "sess')
    with caplog.at_level(logging.WARNING):
        assert store.read() == {}
    aside = list(tmp_path.glob("sessions.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"version": 1, "sess'
    assert str(store.path) in caplog.text and str(aside[0]) in caplog.text
    with store.transaction() as sessions:
        sessions["b"] = make("b")
    assert list(store.read()) == ["b"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text('{"version": 99, "sessions": {}}')
    with pytest.raises(JlremoteError, match="newer jlremote"):
        store.read()


def _add(args: tuple[str, int]) -> None:
    directory, i = args
    store = StateStore(Path(directory))
    for j in range(10):
        with store.transaction() as sessions:
            sessions[f"s{i}-{j}"] = make(f"s{i}-{j}")


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pool.map(_add, [(str(tmp_path), i) for i in range(8)])
    assert len(StateStore(tmp_path).read()) == 80
