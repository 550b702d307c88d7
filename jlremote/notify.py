"""--notify: tell the user that a session is ready, wherever they are looking.

A desktop notification where there is one (`notify-send` on Linux desktops, `osascript`
on macOS), else a terminal bell and one line on the terminal the job was queued from (or
that waits for it). The text names the session, never its token: it goes into argv.
"""

from __future__ import annotations

import logging
import shutil
import sys

from jlremote import proc, untrusted
from jlremote.errors import JlremoteError

log = logging.getLogger(__name__)

_OSASCRIPT = (
    "on run argv",
    "display notification (item 2 of argv) with title (item 1 of argv)",
    "end run",
)


def desktop_argv(title: str, body: str) -> list[str] | None:
    """The command that shows a desktop notification here (None: there is none)."""
    if sys.platform == "darwin":
        found = shutil.which("osascript")
        if found:
            return [found, *(w for line in _OSASCRIPT for w in ("-e", line)), title, body]
        return None
    found = shutil.which("notify-send")
    return [found, "--app-name=jlremote", title, body] if found else None


def tell(title: str, body: str, tty: str = "") -> str:
    """Notify; returns how: `desktop`, `bell` or "" (nowhere to tell)."""
    title, body = untrusted.text(title, 100), untrusted.text(body)  # (node, reason)
    argv = desktop_argv(title, body)
    if argv is not None:
        try:
            done = proc.run(argv, timeout=10, what="the desktop notification")
            if done.returncode == 0:
                return "desktop"
            log.info("%s failed: %s", argv[0], done.stderr.strip())
        except (JlremoteError, OSError) as exc:
            log.info("%s failed: %s", argv[0], exc)
    if tty:
        try:
            with open(tty, "w") as term:
                term.write(f"\a\r\n{title}: {body}\r\n")
            return "bell"
        except OSError as exc:
            log.info("no bell on %s: %s", tty, exc)
    return ""
