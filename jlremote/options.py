"""The options of `start`, defined once: the CLI's flags, config.toml's keys, the canonical
launch options and every check are derived from StartOptions' fields and their `Opt`."""

from __future__ import annotations

import enum
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from jlremote.errors import ExitCode, JlremoteError
from jlremote.state import AppForward

# Seconds `start` waits by default: for the server to come up, and with --slurm also for
# the job to leave the queue.
DEFAULT_TIMEOUT = 60.0
DEFAULT_SLURM_TIMEOUT = 300.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,99}")


class Transport(str, enum.Enum):
    """How the server listens on the remote."""

    AUTO = "auto"  # socket, falling back to TCP where it cannot work
    SOCKET = "socket"  # a 0600 Unix socket in the private session directory
    TCP = "tcp"  # 127.0.0.1 (or, in a job, the node's address)


@dataclass(frozen=True)
class Opt:
    """How one option of `start` is given and checked."""

    flags: tuple[str, ...]  # on the command line: `--port`, `--notebook/--lab`, ...
    help: str
    # Its key in config.toml ("" when it is for the command line only).
    key: str = ""
    choices: tuple[str, ...] = ()
    port: bool = False  # 1 to 65535
    positive: bool = False  # more than 0
    duration: bool = False  # a duration with a unit: 90m, 2h, 1h30m, 45s
    forwards: bool = False  # a list of [LABEL=][LOCAL:]PORT
    panel: str = ""  # its panel in `start --help`
    # Part of what shapes a new server: a live session started with other values is
    # reused with a warning (launch_options()).
    shapes_server: bool = False
    kind: type = str  # filled in from the field's type below


def _opt(
    default: Any, *flags: str, help: str, profile: bool = True, key: str = "", **kw: Any
) -> Any:
    return field(default=default, metadata={"opt": (flags, help, profile, key, kw)})


# The panels of `start --help` (one line of help each there; the details are in the docs).
SERVER, CONNECTION, CLUSTER, APPS, OUTPUT = "Server", "Connection", "Cluster", "Apps", "Output"


def _quiet(_step: str) -> None:
    pass


def _no(_question: str) -> bool:
    return False


Progress = Callable[[str], None]


@dataclass(frozen=True)
class StartOptions:
    """Everything `start` can be asked for. HOST is an argument; the rest are options."""

    host: str
    name: str | None = _opt(
        None, "--name", "-n", help="Session name [default: HOST].", profile=False, panel=SERVER
    )
    notebook: bool = _opt(
        False,
        "--notebook/--lab",
        help="Classic Jupyter Notebook, or JupyterLab.",
        shapes_server=True,
        panel=SERVER,
    )
    directory: str | None = _opt(
        None,
        "--dir",
        "-d",
        help="Remote directory to serve [default: the remote home].",
        key="dir",
        shapes_server=True,
        panel=SERVER,
    )
    env: str | None = _opt(
        None,
        "--env",
        "-e",
        help="Shell run before jupyter, e.g. 'source ~/venv/bin/activate'.",
        shapes_server=True,
        panel=SERVER,
    )
    jupyter: str = _opt(
        "jupyter",
        "--jupyter",
        help="The jupyter executable on the remote [default: jupyter].",
        shapes_server=True,
        panel=SERVER,
    )
    install: bool = _opt(
        False,
        "--install/--no-install",
        help="No jupyter there: install a private one, without asking.",
        panel=SERVER,
    )
    allow_root: bool = _opt(
        False,
        "--allow-root/--no-allow-root",
        help="Pass --allow-root to Jupyter.",
        shapes_server=True,
        panel=SERVER,
    )
    idle_timeout: str | None = _opt(
        None,
        "--idle-timeout",
        help="End the server after this long idle, e.g. 90m, 2h.",
        duration=True,
        shapes_server=True,
        panel=SERVER,
    )
    attach: bool = _opt(
        False,
        "--attach",
        help="Only attach to a running server of this name; never start one.",
        profile=False,
        panel=SERVER,
    )
    local_port: int | None = _opt(
        None,
        "--local-port",
        "-L",
        help="Local port [default: a free one].",
        port=True,
        panel=CONNECTION,
    )
    port: int | None = _opt(
        None,
        "--port",
        help="Remote port (implies --transport tcp) [default: any free one].",
        port=True,
        shapes_server=True,
        panel=CONNECTION,
    )
    transport: Transport = _opt(  # noqa: RUF009 (a field(), as every _opt)
        Transport.AUTO,
        "--transport",
        help="socket (private), tcp (remote 127.0.0.1), or auto.",
        choices=tuple(t.value for t in Transport),
        shapes_server=True,
        panel=CONNECTION,
    )
    timeout: float | None = _opt(
        None,
        "--timeout",
        "-t",
        help="Seconds to wait for the server [default: 60; --slurm 300].",
        positive=True,
        panel=CONNECTION,
    )
    slurm: bool = _opt(
        False,
        "--slurm/--no-slurm",
        help="Run the server in a Slurm job; HOST is the login host.",
        panel=CLUSTER,
    )
    sbatch: str = _opt(
        "",
        "--sbatch",
        help="sbatch options, e.g. '-p gpu -t 04:00:00 --gres=gpu:1'.",
        panel=CLUSTER,
    )
    no_wait: bool = _opt(
        False,
        "--no-wait",
        help="Return once the job is queued; `jlremote wait NAME` for the URL.",
        profile=False,
        panel=CLUSTER,
    )
    notify: bool = _opt(
        False,
        "--notify/--no-notify",
        help="Tell me (desktop or terminal bell) when a queued job is ready.",
        panel=CLUSTER,
    )
    forwards: list[str] | None = _opt(  # noqa: RUF009 (a field(), as every _opt)
        None,
        "--forward",
        help="Also forward an app: [LABEL=][LOCAL:]PORT, e.g. tensorboard=6006.",
        forwards=True,
        panel=APPS,
    )
    open_browser: bool | None = _opt(
        None,
        "--open/--no-open",
        help="Open the browser [default: on a terminal with a display].",
        key="open",
        panel=OUTPUT,
    )
    # Told each step as it begins (a live line on a terminal); not an option.
    progress: Progress = field(default=_quiet, compare=False, repr=False)
    # Asked a yes/no question (at a terminal); not an option. Without one: no.
    confirm: Callable[[str], bool] = field(default=_no, compare=False, repr=False)

    @property
    def wait(self) -> float:
        """Seconds to wait, --timeout or the default."""
        if self.timeout is not None:
            return self.timeout
        return DEFAULT_SLURM_TIMEOUT if self.slurm else DEFAULT_TIMEOUT


def _base_type(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    found = args[0] if args else tp
    if typing.get_origin(found) is list:
        return list
    return str if isinstance(found, type) and issubclass(found, enum.Enum) else found


def _options() -> dict[str, Opt]:
    hints = typing.get_type_hints(StartOptions)
    found = {}
    for f in fields(StartOptions):
        if "opt" not in f.metadata:
            continue
        flags, help_text, profile, key, kw = f.metadata["opt"]
        key = (key or f.name) if profile else ""
        found[f.name] = Opt(flags, help_text, key, kind=_base_type(hints[f.name]), **kw)
    return found


# Field name -> its Opt, in the order of the fields (the CLI shows them so).
OPTIONS: dict[str, Opt] = _options()
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(StartOptions) if f.name in OPTIONS}
# config.toml key -> field name.
PROFILE_KEYS: dict[str, str] = {o.key: name for name, o in OPTIONS.items() if o.key}


def flag(name: str) -> str:
    """The option's flag as the user types it (`--port`; for a switch, its first form)."""
    return OPTIONS[name].flags[0].split("/")[0]


def problem(name: str, value: Any) -> str | None:
    """Why VALUE is not a valid value of option NAME (None: it is)."""
    o = OPTIONS[name]
    if value is None:
        return None
    if o.choices and str(getattr(value, "value", value)) not in o.choices:
        return f"must be one of {', '.join(o.choices)}, not {getattr(value, 'value', value)!r}"
    if o.port and not 1 <= value <= 65535:
        return f"{value} is not a port"
    if o.positive and value <= 0:
        return "must be more than 0 seconds"
    if o.duration:
        try:
            seconds(value)
        except ValueError as exc:
            return str(exc)
    if o.forwards:
        try:
            parse_forwards(value)
        except ValueError as exc:
            return str(exc)
    return None


_FORWARD = re.compile(r"(?:([A-Za-z][A-Za-z0-9._-]{0,31})=)?(?:(\d{1,5}):)?(\d{1,5})")


def parse_forward(text: str) -> AppForward:
    """`[LABEL=][LOCAL:]PORT` as the app's record: its label (default: its port), the
    local port (0: a free one, picked when it is forwarded) and its port beside the
    server."""
    found = _FORWARD.fullmatch(text.strip()) if isinstance(text, str) else None
    if not found:
        raise ValueError(f"not [LABEL=][LOCAL:]PORT: {text!r} (e.g. 6006 or tensorboard=6006)")
    label, local, port = found.groups()
    for value in (local, port):
        if value is not None and not 1 <= int(value) <= 65535:
            raise ValueError(f"{int(value)} is not a port")
    return AppForward(label or port, int(local or 0), int(port))


def parse_forwards(texts: list[str]) -> list[AppForward]:
    """Each of TEXTS parsed; a label, remote port or local port given twice is an error."""
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError('must be a list of strings such as "tensorboard=6006"')
    found = [parse_forward(t) for t in texts]
    for what, values in (
        ("the label", [f.label for f in found]),
        ("port", [str(f.remote_port) for f in found]),
        ("local port", [str(f.local_port) for f in found if f.local_port]),
    ):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"{what} {twice[0]!r} is given twice")
    return found


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def seconds(text: str) -> int:
    """A duration as the user writes it (`90m`, `2h`, `1h30m`, `45s`, `1d`) in seconds."""
    found = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if not found or not any(found.groups()):
        raise ValueError(f"not a duration: {text!r} (give a unit: 90m, 2h, 1h30m, 45s)")
    total = sum(int(g or 0) * mult for g, (_, mult) in zip(found.groups(), _UNITS, strict=True))
    if total < 10:
        raise ValueError(f"{text!r} is too short (10s at least)")
    return total


def spoken(total: int) -> str:
    """SECONDS as the shortest duration text: 7200 -> `2h`, 5400 -> `1h30m`."""
    parts = []
    for unit, mult in _UNITS:
        if total >= mult:
            parts.append(f"{total // mult}{unit}")
            total %= mult
    return "".join(parts) or "0s"


def check_name(name: str) -> str:
    """Session names go into file names and tables: keep them plain."""
    if not _NAME.fullmatch(name):
        raise JlremoteError(
            f"not a valid session name: {name!r} (letters, digits and ._@:+- only)",
            ExitCode.USAGE,
        )
    return name


def validate(opts: StartOptions) -> StartOptions:
    """Check OPTS (each value, then how they go together); returns them complete: the
    session's name, the timeout, the transport as a Transport. Raises ExitCode.USAGE."""
    from jlremote import slurm, ssh

    ssh.check_host(opts.host)
    name = check_name(opts.name or opts.host)
    for key in OPTIONS:
        why = problem(key, getattr(opts, key))
        if why is not None:
            raise JlremoteError(f"{flag(key)}: {why}", ExitCode.USAGE)
    transport = Transport(getattr(opts.transport, "value", opts.transport))
    if "\n" in opts.jupyter:
        raise JlremoteError("--jupyter: a newline is not part of a path", ExitCode.USAGE)
    if transport == Transport.SOCKET and opts.port is not None:
        raise JlremoteError("--port makes no sense with --transport socket", ExitCode.USAGE)
    if opts.sbatch and not opts.slurm:
        raise JlremoteError("--sbatch needs --slurm", ExitCode.USAGE)
    if opts.no_wait and not opts.slurm:
        raise JlremoteError(
            "--no-wait needs --slurm (a server on the host starts in seconds)", ExitCode.USAGE
        )
    if opts.slurm:
        for given, what in (
            (opts.port is not None, "--port (the job picks a free port on its node)"),
            (transport == Transport.SOCKET, "--transport socket (the node is another machine)"),
            (opts.attach, "--attach"),
        ):
            if given:
                raise JlremoteError(f"--slurm does not go with {what}", ExitCode.USAGE)
        slurm.parse_sbatch_options(opts.sbatch)  # refuse bad options before connecting
    idle = spoken(seconds(opts.idle_timeout)) if opts.idle_timeout else None
    return replace(opts, name=name, timeout=opts.wait, transport=transport, idle_timeout=idle)


def launch_options(opts: StartOptions) -> str:
    """The options that shape a new server, as a canonical string (kept in the record)."""
    shaping = {
        o.key: getattr(getattr(opts, name), "value", getattr(opts, name))
        for name, o in OPTIONS.items()
        if o.shapes_server
    }
    if opts.slurm:  # absent otherwise, so that older records still compare equal
        shaping.update(slurm=True, sbatch=opts.sbatch)
    return json.dumps(shaping, sort_keys=True)
