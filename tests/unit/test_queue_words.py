"""The pure parts of #12: durations as users write them, and the notification's argv."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jlremote import notify
from jlremote.options import seconds, spoken


@pytest.mark.parametrize(
    ("text", "total", "said"),
    [
        ("90m", 5400, "1h30m"),
        ("2h", 7200, "2h"),
        ("1h30m", 5400, "1h30m"),
        ("45s", 45, "45s"),
        ("1d", 86400, "1d"),
        (" 2H ", 7200, "2h"),
        ("1h0m30s", 3630, "1h30s"),
    ],
)
def test_durations(text: str, total: int, said: str) -> None:
    assert seconds(text) == total and spoken(total) == said


@pytest.mark.parametrize(
    ("text", "words"),
    [("5", "give a unit"), ("", "give a unit"), ("2x", "not a duration"), ("m", "give a unit"),
     ("9s", "too short"), ("1.5h", "not a duration"), ("-2h", "not a duration")],
)  # fmt: skip
def test_bad_durations(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        seconds(text)


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux: notify-send")
def test_the_desktop_notification_is_notify_send_with_plain_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert notify.desktop_argv("t", "b") is None
    fake = tmp_path / "notify-send"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert notify.desktop_argv("jlremote: x is ready", "job 5 runs") == [
        str(fake), "--app-name=jlremote", "jlremote: x is ready", "job 5 runs"
    ]  # fmt: skip


def test_without_a_desktop_the_terminal_gets_a_bell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    tty = tmp_path / "tty"
    tty.write_text("")
    assert notify.tell("jlremote: x is ready", "job 5 runs", str(tty)) == "bell"
    assert tty.read_bytes() == b"\a\r\njlremote: x is ready: job 5 runs\r\n"
    assert notify.tell("t", "b", "") == ""
