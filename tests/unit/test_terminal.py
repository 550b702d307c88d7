"""Text from the remote reaches a terminal without its control sequences."""

from __future__ import annotations

import pytest

from jlremote.terminal import clean


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain line\twith tab\nand newline", "plain line\twith tab\nand newline"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("\x1b]0;pwned title\x07after", "after"),
        ("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("erase\x1b[2J\x1b[Hall", "eraseall"),
        ("bell\x07 back\x08space\rreturn", "bell backspacereturn"),
        ("c1\x9b31m", "c131m"),
        ("\x1bPdevice control\x1b\\ok", "ok"),
        ("lone escape at end\x1b", "lone escape at end"),
        ("ünïcode ✓ stays", "ünïcode ✓ stays"),
    ],
)
def test_clean_removes_control_sequences(text: str, expected: str) -> None:
    assert clean(text) == expected
