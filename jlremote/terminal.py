"""Text from the remote (server logs, remote stderr, session names) made safe for a
terminal: escape sequences could retitle it, rewrite what was printed or worse."""

from __future__ import annotations

import logging
import re

_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, erasing
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, hyperlinks, clipboard
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]?"  # any other escape
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """TEXT without terminal control sequences or control characters (newlines and tabs
    stay)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


class CleanFormatter(logging.Formatter):
    """Log lines carry the remote's words (node names, addresses, ssh's stderr): cleaned."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record))
