"""Where jlremote keeps its files on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """The state directory: $JLREMOTE_STATE_DIR, else platformdirs' user state dir.

    platformdirs honours XDG_STATE_HOME on Linux.
    """
    override = os.environ.get("JLREMOTE_STATE_DIR")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_state_path

    return user_state_path("jlremote", appauthor=False)


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed; the directory itself is made mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
