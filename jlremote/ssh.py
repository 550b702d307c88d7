"""Pure builders of every `ssh` argv jlremote runs, and what ssh's failures mean.

Nothing here starts a process: proc.run() does that. The user's own OpenSSH and its
~/.ssh/config decide how to reach a host; we only add options that the job needs and never
one that weakens host-key checking.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass

from jlremote import untrusted
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
    # Where jlremote's own control sockets live (None: no connection sharing).
    control_dir: str | None = None
    # One login node behind a name that leads to several: (its address, the name its host
    # key is known by). Every connection goes there, and known_hosts still verifies it.
    pin: tuple[str, str] | None = None
    # Never a prompt (BatchMode: not on a terminal, not through SSH_ASKPASS): what runs
    # in the background (the tunnel keeper) and the first look at a host.
    batch: bool = False

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
        from jlremote.paths import runtime_dir

        return cls(
            binary=found,
            config_file=os.environ.get("JLREMOTE_SSH_CONFIG") or None,
            connect_timeout=connect_timeout,
            control_dir=str(runtime_dir()),
        )


def check_host(host: str) -> str:
    """Reject a HOST that ssh would read as an option or that could not be a destination."""
    if not host or host.startswith("-") or any(c.isspace() for c in host) or "\0" in host:
        raise JlremoteError(f"not a valid ssh destination: {host!r}", ExitCode.USAGE)
    return host


# Every connection of ours leaves out what the user's config asks for their own sessions:
# their forwardings (a `LocalForward 8888 ...` to a busy port would fail ours), and agent
# and X11 forwarding, which a connection that lives for days must not carry.
PRIVATE_OPTIONS = (
    "-o", "ClearAllForwardings=yes",
    "-o", "ForwardAgent=no",
    "-o", "ForwardX11=no",
)  # fmt: skip


def _base(cfg: SshConfig) -> list[str]:
    argv = [cfg.binary]
    if cfg.config_file:
        argv += ["-F", cfg.config_file]
    if cfg.pin is not None:
        # The address came from the remote (SSH_CONNECTION): `%h` in the user's
        # ProxyCommand would run anything else in a local shell (untrusted).
        addr = untrusted.address(cfg.pin[0])
        argv += ["-o", f"HostName={addr}", "-o", f"HostKeyAlias={cfg.pin[1]}"]
    if cfg.batch:
        argv += ["-o", "BatchMode=yes"]
    return argv


def host_key_alias(resolved: str) -> str:
    """The name known_hosts holds HOST's key under, from `ssh -G HOST`'s output: its
    HostKeyAlias, else its HostName (with `[...]:PORT` off port 22)."""
    conf: dict[str, str] = {}
    for line in resolved.splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), value.strip())
    if conf.get("hostkeyalias") and conf["hostkeyalias"] != "none":
        return conf["hostkeyalias"]
    name, port = conf.get("hostname", ""), conf.get("port", "22")
    return name if port == "22" else f"[{name}]:{port}"


def _mux_client(cfg: SshConfig, path: str) -> list[str]:
    """ssh talking to the master at PATH only. No configuration file: a `-O forward`
    client would send the config's forwardings along with ours (ClearAllForwardings would
    clear ours too), and a master needs nothing else from it."""
    return [cfg.binary, "-F", "/dev/null", "-o", f"ControlPath={path}"]


def control_path(cfg: SshConfig) -> str | None:
    """jlremote's own ControlPath for short commands (ssh expands %C per host)."""
    return f"{cfg.control_dir}/cm-%C" if cfg.control_dir else None


def command_argv(cfg: SshConfig, host: str, command: str) -> list[str]:
    """`ssh HOST -- COMMAND` for a short remote command: no pty (a pty would kill a server
    on hang-up). It shares a connection through jlremote's own ControlMaster (kept 30 s),
    never the user's and never the tunnel's, so no command can take a listener with it."""
    argv = [*_base(cfg), "-T", *PRIVATE_OPTIONS, "-o", f"ConnectTimeout={cfg.connect_timeout}"]
    path = control_path(cfg)
    if path:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={path}", "-o", "ControlPersist=30"]
    return [*argv, "--", host, command]


def control_exit_argv(cfg: SshConfig, host: str) -> list[str]:
    """Close jlremote's shared control connection to HOST (`ssh -O exit`)."""
    return [*_base(cfg), "-o", f"ControlPath={control_path(cfg)}", "-O", "exit", "--", host]


@dataclass(frozen=True)
class Target:
    """Where a forward goes, as the remote end sees it: a Unix socket there, or HOST:PORT
    (HOST "" is its own 127.0.0.1; a compute node's address behind a login host)."""

    port: int = 0
    socket: str = ""
    host: str = ""


def forward_spec(listen: int | str, target: Target) -> str:
    """The -L argument: our loopback's port LISTEN, or our Unix socket at path LISTEN,
    to TARGET."""
    here = listen if isinstance(listen, str) else f"127.0.0.1:{listen}"
    if target.socket:
        return f"{here}:{target.socket}"
    host = target.host or "127.0.0.1"
    if target.host:  # a job's node, as the remote named it
        untrusted.remote_host(host)
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{here}:{host}:{target.port}"


def tunnel_master_argv(
    cfg: SshConfig, host: str, path: str, log_file: str, node: str = ""
) -> list[str]:
    """The tunnel's own connection: a dedicated master at PATH used for nothing but this
    session's forward, so its listener dies with it and with nothing else. ssh returns
    (-f) once authenticated, which can prompt on the terminal first; keepalives make it exit
    when the link is dead. Its messages go to LOG_FILE (-E): once backgrounded, ssh sends
    stderr to /dev/null, and a refused forward must still be visible.

    With NODE (a compute node of a job), the connection goes to that node through HOST
    (see node_route_options), and never prompts: a node that wants a password is not a
    route."""
    to_node = [*_to_node(cfg, host, node), "-o", "BatchMode=yes"] if node else []
    return [
        *_base(cfg),
        *to_node,
        "-f", "-N", "-T", "-E", log_file,
        *PRIVATE_OPTIONS,
        "-o", "ControlMaster=yes",
        "-o", f"ControlPath={path}",
        "-o", "ControlPersist=no",
        "-o", "ExitOnForwardFailure=yes",
        "-o", "StreamLocalBindUnlink=yes",
        "-o", "StreamLocalBindMask=0177",
        "-o", f"ServerAliveInterval={KEEPALIVE_INTERVAL}",
        "-o", f"ServerAliveCountMax={KEEPALIVE_COUNT}",
        "-o", f"ConnectTimeout={cfg.connect_timeout}",
        "-o", "PermitLocalCommand=no",
        "--", node or host,
    ]  # fmt: skip


def _to_node(cfg: SshConfig, host: str, node: str) -> list[str]:
    """node_route_options, for a NODE the remote named: checked first (it becomes %h in
    that ProxyCommand, and the destination of the outer ssh)."""
    untrusted.host_name(node)
    return node_route_options(cfg, host)


def node_route_options(cfg: SshConfig, host: str) -> list[str]:
    """Reach a compute node through HOST, as ProxyJump would (HOST resolves the node's
    name; the node's host key is checked here, as for any host), but through jlremote's
    own shared connection to HOST when it is up: no new login there (no second 2FA code),
    no new handshake. Never a prompt from the hop."""
    hop = [*_base(cfg), *PRIVATE_OPTIONS, "-o", "BatchMode=yes", "-o", "ControlMaster=no"]
    path = control_path(cfg)
    if path:
        hop += ["-o", f"ControlPath={path}"]
    # ssh expands %-tokens in ProxyCommand for the node: ours are for the hop's own ssh.
    words = [shlex.quote(w).replace("%", "%%") for w in [*hop, "-W", "-", "--", host]]
    words[-3] = "%h:%p"  # the node and its port, filled in by the outer ssh
    return ["-o", f"ProxyCommand={' '.join(words)}"]


def forward_argv(
    cfg: SshConfig, host: str, path: str, listen: int | str, target: Target, cancel: bool = False
) -> list[str]:
    """Ask the tunnel's master at PATH to listen on 127.0.0.1:LISTEN, or on the Unix socket
    at path LISTEN (`ssh -O forward`), or with CANCEL to stop (`ssh -O cancel`)."""
    spec = forward_spec(listen, target)
    op = "cancel" if cancel else "forward"
    return [*_mux_client(cfg, path), "-O", op, "-L", spec, "--", host]


def version_argv(cfg: SshConfig) -> list[str]:
    """`ssh -V`: the client's version (printed on stderr)."""
    return [cfg.binary, "-V"]


def resolve_argv(cfg: SshConfig, host: str) -> list[str]:
    """`ssh -G HOST`: the configuration ssh would use for HOST, after ~/.ssh/config."""
    return [*_base(cfg), "-G", "--", host]


def probe_connect_argv(cfg: SshConfig, host: str, node: str = "") -> list[str]:
    """A fresh connection that may not prompt (BatchMode) and shares nothing, so that it
    really tests reaching and authenticating to HOST (or to NODE through HOST, as the
    tunnel would), and how long that takes."""
    jump = _to_node(cfg, host, node) if node else []
    return [
        *_base(cfg), "-T", *PRIVATE_OPTIONS, *jump,
        "-o", "BatchMode=yes",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", f"ConnectTimeout={cfg.connect_timeout}",
        "--", node or host, "true",
    ]  # fmt: skip


def check_master_argv(cfg: SshConfig, host: str, path: str) -> list[str]:
    """`ssh -O check`: prints `Master running (pid=N)` when the master at PATH is up."""
    return [*_mux_client(cfg, path), "-O", "check", "--", host]


def via_master_argv(cfg: SshConfig, host: str, path: str, command: str) -> list[str]:
    """`ssh HOST -- COMMAND` through the tunnel's own master at PATH: no new login. Should
    that master be gone, the fresh connection ssh falls back to may not prompt."""
    return [
        *_base(cfg), "-T", *PRIVATE_OPTIONS,
        "-o", "ControlMaster=no",
        "-o", f"ControlPath={path}",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={cfg.connect_timeout}",
        "--", host, command,
    ]  # fmt: skip


# ssh's refusal when the host wants a password or a code and nobody was asked (BatchMode).
_ASKS = r"Permission denied \([^)]*(password|keyboard-interactive)"
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
        _ASKS,
        ExitCode.AUTH,
        "authentication to {host} failed (it asks for a password or a code; try: ssh {host} true)",
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
            asks = pattern == _ASKS
            return JlremoteError(message.format(host=host), code, needs_user=asks)
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = f": {last[-1].strip()}" if last else ""
    return JlremoteError(f"ssh to {host} failed{tail}", ExitCode.CONNECT)


def config_hosts(paths: list[str] | None = None) -> list[str]:
    """Host aliases (no patterns) named in the ssh configuration: $JLREMOTE_SSH_CONFIG or
    ~/.ssh/config, following Include. For completion only: ssh itself resolves hosts."""
    import glob

    home_ssh = os.path.expanduser("~/.ssh")
    todo = paths or [os.environ.get("JLREMOTE_SSH_CONFIG") or os.path.join(home_ssh, "config")]
    seen: set[str] = set()
    names: list[str] = []
    while todo:
        path = os.path.expanduser(todo.pop(0))
        if path in seen:
            continue
        seen.add(path)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.strip().replace("=", " ", 1).split()
            if len(words) < 2:
                continue
            key = words[0].lower()
            if key == "host":
                names += [w for w in words[1:] if not any(c in w for c in "*?!")]
            elif key == "include":
                for pattern in words[1:]:
                    full = os.path.join(home_ssh, os.path.expanduser(pattern))
                    todo += sorted(glob.glob(full))
    return list(dict.fromkeys(names))
