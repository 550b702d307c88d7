"""The live progress line of `start`: one line on stderr (a terminal only), the current
step and the time so far, redrawn in place and erased at the end. Stdout never sees it."""

from __future__ import annotations

import shutil
import sys
import threading
import time

from jlremote.untrusted import text as text_of_remote


class ProgressLine:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.text = ""
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._ticker: threading.Thread | None = None

    def step(self, text: str) -> None:
        """Show TEXT as the current step (and keep its clock ticking)."""
        if not self.enabled:
            return
        with self._lock:
            self.text = text_of_remote(text)  # (a node name, Slurm's reason)
            self._draw()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._done.wait(0.2):
            with self._lock:
                self._draw()

    def _draw(self) -> None:
        if self._done.is_set():
            return
        width = shutil.get_terminal_size((80, 24)).columns - 1
        line = f"jlremote: {self.text} ({time.monotonic() - self.started:.1f}s)"
        sys.stderr.write("\r\x1b[K" + line[:width])
        sys.stderr.flush()

    def close(self) -> None:
        """Erase the line (before anything else is printed)."""
        with self._lock:
            self._done.set()
            if self.enabled and self.text:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
