"""Shell completion: the candidates (session names, hosts) and the script for a shell."""

from __future__ import annotations

import os
from typing import Any

SHELLS = ("bash", "zsh", "fish")


def sessions(incomplete: str) -> list[str]:
    """Session names from the state file (never fails)."""
    try:
        from jlremote.paths import state_dir
        from jlremote.state import StateStore

        return sorted(n for n in StateStore(state_dir()).read() if n.startswith(incomplete))
    except Exception:
        return []


def hosts(incomplete: str) -> list[str]:
    """Host aliases from the ssh configuration and config.toml (never fails)."""
    try:
        from jlremote import config, ssh

        names = set(ssh.config_hosts())
        names.update(h for h in config.load().hosts if not any(c in h for c in "*?["))
        return sorted(n for n in names if n.startswith(incomplete))
    except Exception:
        return []


def print_script(command: Any, shell: str) -> None:
    """Print the completion script of SHELL for COMMAND (the app's click command): the
    completion protocol of typer's click, asked directly, never guessing the shell."""
    os.environ["_JLREMOTE_COMPLETE"] = f"source_{shell}"
    command.main(args=[], prog_name="jlremote", complete_var="_JLREMOTE_COMPLETE")
