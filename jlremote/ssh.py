"""Pure builders of every `ssh` argv jlremote runs, and what ssh's failures mean.

Nothing here starts a process: proc.run() does that. The user's own OpenSSH and its
~/.ssh/config decide how to reach a host; we only add options that the job needs and never
one that weakens host-key checking.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

from jlremote.errors import ExitCode, JlremoteError

# Keepalives for the tunnel: a dead connection is noticed within ~15 s.
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


@dataclass(frozen=True)
class SshConfig:
    """How to invoke ssh: the binary, an optional -F config file, the connect timeout."""

    binary: str = "ssh"
    config_file: str | None = None
    connect_timeout: int = 10

    @classmethod
    def from_environment(cls, connect_timeout: int = 10) -> SshConfig:
        """Find `ssh` ($JLREMOTE_SSH or PATH) and honour $JLREMOTE_SSH_CONFIG (ssh -F)."""
        wanted = os.environ.get("JLREMOTE_SSH", "ssh")
        found = shutil.which(wanted)
        if found is None:
            searched = os.environ.get("PATH", "")
            raise JlremoteError(
                f"'{wanted}' (OpenSSH client) not found; searched PATH={searched}. "
                "Install OpenSSH or set JLREMOTE_SSH to its path",
                ExitCode.NO_SSH,
            )
        return cls(
            binary=found,
            config_file=os.environ.get("JLREMOTE_SSH_CONFIG") or None,
            connect_timeout=connect_timeout,
        )


def check_host(host: str) -> str:
    """Reject a HOST that ssh would read as an option or that could not be a destination."""
    if not host or host.startswith("-") or any(c.isspace() for c in host) or "\0" in host:
        raise JlremoteError(f"not a valid ssh destination: {host!r}", ExitCode.USAGE)
    return host


def _base(cfg: SshConfig) -> list[str]:
    argv = [cfg.binary]
    if cfg.config_file:
        argv += ["-F", cfg.config_file]
    return argv


def command_argv(cfg: SshConfig, host: str, command: str) -> list[str]:
    """`ssh HOST -- COMMAND` for a short remote command: no pty (a pty would kill a server
    on hang-up), the user's config otherwise untouched (their ControlMaster is welcome)."""
    return [
        *_base(cfg),
        "-T",
        "-o",
        f"ConnectTimeout={cfg.connect_timeout}",
        "--",
        host,
        command,
    ]


def forward_spec(local_port: int, remote_port: int) -> str:
    """The -L argument: loopback on both ends, never a network-facing address."""
    return f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}"


def tunnel_argv(cfg: SshConfig, host: str, local_port: int, remote_port: int) -> list[str]:
    """The tunnel: its own connection (ControlPath=none, so a user's master cannot take the
    listener), backgrounded by ssh itself (-f) only once the forward is listening
    (ExitOnForwardFailure), with keepalives so a dead link makes it exit."""
    return [
        *_base(cfg),
        "-f",
        "-N",
        "-T",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ControlMaster=no",
        "-o",
        "ControlPath=none",
        "-o",
        f"ServerAliveInterval={KEEPALIVE_INTERVAL}",
        "-o",
        f"ServerAliveCountMax={KEEPALIVE_COUNT}",
        "-o",
        f"ConnectTimeout={cfg.connect_timeout}",
        "-o",
        "PermitLocalCommand=no",
        "-L",
        forward_spec(local_port, remote_port),
        "--",
        host,
    ]


_PATTERNS: list[tuple[str, ExitCode, str]] = [
    (r"Could not resolve hostname", ExitCode.CONNECT, "cannot resolve host {host}"),
    (r"Connection refused", ExitCode.CONNECT, "connection to {host} refused (is sshd running?)"),
    (
        r"timed out|Connection timed out|Operation timed out",
        ExitCode.CONNECT,
        "connection to {host} timed out",
    ),
    (r"No route to host|Network is unreachable", ExitCode.CONNECT, "no route to {host}"),
    (
        r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed"
        r"|No .* host key is known",
        ExitCode.AUTH,
        "host key verification failed for {host}: check the key and your known_hosts "
        "(jlremote never bypasses host-key checking)",
    ),
    (
        r"Permission denied|Too many authentication failures|Authentication failed",
        ExitCode.AUTH,
        "authentication to {host} failed (try: ssh {host} true)",
    ),
]


def explain_failure(host: str, stderr: str) -> JlremoteError:
    """Turn ssh's own failure (exit 255) into one actionable line."""
    for pattern, code, message in _PATTERNS:
        if re.search(pattern, stderr):
            return JlremoteError(message.format(host=host), code)
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = f": {last[-1].strip()}" if last else ""
    return JlremoteError(f"ssh to {host} failed{tail}", ExitCode.CONNECT)
