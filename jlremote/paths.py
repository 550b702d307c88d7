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


def runtime_dir() -> Path:
    """A short private directory for ssh control sockets (their paths are length-limited).

    $JLREMOTE_RUNTIME_DIR, else /tmp/jlremote-<uid>. It must be ours and mode 0700: a
    directory another user made first could intercept our ssh connections.
    """
    override = os.environ.get("JLREMOTE_RUNTIME_DIR")
    path = Path(override).expanduser() if override else Path(f"/tmp/jlremote-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        from jlremote.errors import ExitCode, JlremoteError

        raise JlremoteError(
            f"{path} is not a private directory of yours (mode 0700); remove it or set "
            "JLREMOTE_RUNTIME_DIR",
            ExitCode.ERROR,
        )
    return path
