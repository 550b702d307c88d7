"""The command line: parse arguments, call a command, render its result, map errors to exit
codes. The only module that prints or exits."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Annotated, Any

import typer

from jlremote import __version__
from jlremote.errors import ExitCode, JlremoteError
from jlremote.terminal import clean

log = logging.getLogger("jlremote")

app = typer.Typer(
    name="jlremote",
    help="Put a JupyterLab running on a remote machine into your local browser, over your "
    "own OpenSSH, with one command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    epilog="Exit codes: 0 ok, 1 other error, 2 usage, 3 ssh missing, 4 cannot connect, "
    "5 authentication or host key, 6 remote environment (jupyter, --dir, --env, sbatch), "
    "7 server did not start (or the job, in time), 8 local port busy, 9 no such session, "
    "10 tunnel failed, 130 interrupted. Files: config.toml (`jlremote config path`). "
    "Environment: JLREMOTE_CONFIG, JLREMOTE_STATE_DIR, JLREMOTE_SSH, JLREMOTE_SSH_CONFIG.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Debug logs on stderr (ssh argv included).")
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger("jlremote")
    if verbose:
        root.setLevel(logging.DEBUG)
    elif root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        fmt = (
            "jlremote: %(relativeCreated)6.0fms %(message)s" if verbose else "jlremote: %(message)s"
        )
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    root.propagate = False


def _fail(exc: JlremoteError) -> typer.Exit:
    # Messages and details quote the remote's words (its stderr, a server log): cleaned.
    typer.echo(f"jlremote: error: {clean(exc.message)}", err=True)
    if exc.detail:
        typer.echo(clean(exc.detail.rstrip("\n")), err=True)
    log.debug("exit code %d", int(exc.code), exc_info=exc)
    return typer.Exit(int(exc.code))


def _guarded(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a command function; a JlremoteError becomes one line on stderr and its exit code."""
    try:
        return func(*args, **kwargs)
    except JlremoteError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        typer.echo("jlremote: interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if log.isEnabledFor(logging.DEBUG):
            raise
        typer.echo(f"jlremote: internal error: {exc!r} (run with -v for details)", err=True)
        raise typer.Exit(int(ExitCode.ERROR)) from None


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Aligned columns; the last one is not padded (URLs are long)."""
    table = [header, *[tuple(clean(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        typer.echo("  ".join([*cells, row[-1]]))


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _ago(iso: str | None) -> str:
    """The server's last activity (an ISO time in UTC) as `5m ago`; `-` if unknown."""
    if not iso:
        return "-"
    from datetime import datetime, timezone

    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    return _duration(max(0.0, (datetime.now(timezone.utc) - then).total_seconds())) + " ago"


class _ProgressLine:
    """One live line on stderr (a terminal only): the current step and the time so far,
    redrawn in place, erased at the end. Stdout never sees it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.text = ""
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._ticker: threading.Thread | None = None

    def step(self, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.text = text
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
        with self._lock:
            self._done.set()
            if self.enabled and self.text:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"jlremote {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Verbose = False,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = None,
) -> None:
    """jlremote: a remote JupyterLab in your local browser, over SSH.

    Exit codes: 0 ok, 1 other error, 2 usage, 3 ssh missing, 4 cannot connect,
    5 authentication or host key, 6 remote environment (jupyter, --dir, --env, sbatch),
    7 server did not start (or the job, in time), 8 local port busy, 9 no such session,
    10 tunnel failed, 130 interrupted.
    """
    _setup_logging(verbose)


def _profile(host: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options for HOST: the command line's, else config.toml's, else the defaults."""
    from jlremote import config

    conf = _guarded(config.load)
    return conf.effective(host, given)  # type: ignore[no-any-return]


def _want_browser(open_flag: bool | None) -> bool:
    if open_flag is not None:
        return open_flag
    if not sys.stdout.isatty():
        return False
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


@app.command()
def start(
    host: Annotated[
        str,
        typer.Argument(
            help="Anything ssh accepts: an alias from ~/.ssh/config, host, or user@host.",
            autocompletion=_complete_hosts,
            show_default=False,
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Session name (default: HOST).")
    ] = None,
    notebook: Annotated[
        bool | None,
        typer.Option("--notebook/--lab", help="Run classic Jupyter Notebook, or JupyterLab."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            help="Preferred remote port (default: a free one the remote picks). "
            "The port the server really binds is the one forwarded.",
        ),
    ] = None,
    local_port: Annotated[
        int | None,
        typer.Option(
            "--local-port", "-L", help="Local port (default: a free one). Busy is an error."
        ),
    ] = None,
    directory: Annotated[
        str | None,
        typer.Option(
            "--dir",
            "-d",
            help="Remote directory to serve (default: the remote home). "
            "Relative paths and ~ are under the remote home.",
        ),
    ] = None,
    env: Annotated[
        str | None,
        typer.Option(
            "--env",
            "-e",
            help="Shell snippet run on the remote before jupyter, e.g. "
            "'source ~/venv/bin/activate' or 'module load python'.",
        ),
    ] = None,
    jupyter: Annotated[
        str | None,
        typer.Option("--jupyter", help="The jupyter executable on the remote [default: jupyter]."),
    ] = None,
    allow_root: Annotated[
        bool | None,
        typer.Option(
            "--allow-root/--no-allow-root",
            help="Pass --allow-root to Jupyter (it refuses root otherwise).",
        ),
    ] = None,
    open_browser: Annotated[
        bool | None,
        typer.Option(
            "--open/--no-open",
            help="Open the browser (default: only on a terminal with a display).",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            help="Seconds to wait for the server to come up (default 60; with --slurm 300, "
            "queue wait included).",
            min=1,
        ),
    ] = None,
    transport: Annotated[
        str | None,
        typer.Option(
            "--transport",
            help="How the server listens on the remote: `socket` (a 0600 Unix socket in the "
            "private session directory: no remote port, no other user can connect), `tcp` "
            "(127.0.0.1), or `auto` (socket, falling back to TCP where it cannot work) "
            "[default: auto].",
        ),
    ] = None,
    attach: Annotated[
        bool,
        typer.Option(
            "--attach",
            help="Only attach to a server of this name already running on HOST (started from "
            "any computer); never start one. Without it, such a server is attached to anyway.",
        ),
    ] = False,
    use_slurm: Annotated[
        bool | None,
        typer.Option(
            "--slurm/--no-slurm",
            help="Run the server in a Slurm batch job on a compute node; HOST is the login "
            "host, and the tunnel goes through it to the node.",
        ),
    ] = None,
    sbatch: Annotated[
        str | None,
        typer.Option(
            "--sbatch",
            help="Extra sbatch options for --slurm, e.g. '-p gpu -t 04:00:00 --gres=gpu:1' "
            "(each passed to sbatch as its own argument).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress line on stderr.")
    ] = False,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Start JupyterLab on HOST (or reuse the running session) and print its URL.

    The URL, with its token, is the only line on stdout (or the JSON with `--json`), so
    `$(jlremote start HOST)` works in scripts. Running it again for a live session prints
    the same URL and starts nothing new. On a terminal, one live line on stderr shows
    what it is doing.
    """
    _setup_logging(verbose)
    from jlremote.commands.start import StartOptions
    from jlremote.commands.start import start as do_start
    from jlremote.results import StartResult

    given = {
        "notebook": notebook,
        "port": port,
        "local_port": local_port,
        "dir": directory,
        "env": env,
        "jupyter": jupyter,
        "allow_root": allow_root,
        "open": open_browser,
        "timeout": timeout,
        "transport": transport,
        "slurm": use_slurm,
        "sbatch": sbatch,
    }
    conf = _profile(host, given)
    line = _ProgressLine(enabled=not quiet and not verbose and sys.stderr.isatty())

    def run(opts: StartOptions) -> StartResult:
        try:
            return do_start(opts)
        finally:
            line.close()  # before any error is printed

    result: StartResult = _guarded(
        run,
        StartOptions(
            host=host,
            name=name,
            notebook=conf["notebook"],
            port=conf["port"],
            local_port=conf["local_port"],
            directory=conf["dir"],
            env=conf["env"],
            jupyter=conf["jupyter"],
            allow_root=conf["allow_root"],
            timeout=conf["timeout"],
            transport=conf["transport"],
            attach=attach,
            slurm=conf["slurm"],
            sbatch=conf["sbatch"],
            progress=line.step,
        ),
    )
    if _want_browser(conf["open"]):
        from jlremote.browser import open_url

        _guarded(open_url, result.name, result.url)
    if as_json:
        _print_json(result.to_json())
    else:
        typer.echo(result.url)


@app.command()
def status(
    name: Annotated[
        str | None,
        typer.Argument(
            help="Only this session.", autocompletion=_complete_sessions, show_default=False
        ),
    ] = None,
    remote_host: Annotated[
        str | None,
        typer.Option(
            "--remote",
            help="List the jlremote servers running on this host (from any client) instead.",
        ),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Do not ask the remotes (server shows as unknown).")
    ] = False,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Show each session: host, server (running/gone/unknown), tunnel
    (up/reconnecting/failed/down), URL. `--json` adds uptime, transport, who else can
    connect (exposure: private, host or cluster), the server's last activity and the
    tunnel's reconnection attempts and last error."""
    _setup_logging(verbose)
    if remote_host is not None:
        from jlremote.commands.status import remote_status

        found = _guarded(remote_status, remote_host)
        if as_json:
            _print_json([r.to_json() for r in found])
        elif found:
            _print_table(
                ("NAME", "SESSION", "PID", "TRANSPORT", "HERE"),
                [
                    (
                        r.name,
                        r.session_id,
                        str(r.server_pid),
                        r.transport,
                        "yes" if r.local else "no",
                    )
                    for r in found
                ],
            )
        return
    from jlremote.commands.status import status as do_status

    rows = _guarded(do_status, name, offline)
    if as_json:
        _print_json([r.to_json() for r in rows])
        return
    if not rows:
        if sys.stderr.isatty():
            typer.echo("no sessions", err=True)
        return
    jobs = any(r.job_id for r in rows)
    _print_table(
        ("NAME", "HOST", "SERVER", "TUNNEL", "UPTIME", "ACTIVE")
        + (("JOB", "NODE", "STATE", "LEFT") if jobs else ())
        + ("URL",),
        [
            (
                r.name,
                r.host,
                r.server,
                r.tunnel if not r.tunnel_attempts else f"{r.tunnel} ({r.tunnel_attempts})",
                _duration(r.uptime_s),
                _ago(r.last_activity),
            )
            + (
                (r.job_id or "-", r.node or "-", r.job_state or "-", r.time_left or "-")
                if jobs
                else ()
            )
            + (r.url,)
            for r in rows
        ],
    )
    for r in rows:
        if r.error:
            typer.echo(f"jlremote: {r.name}: {r.error}", err=True)
        if r.tunnel_error and r.tunnel != "up":
            typer.echo(
                f"jlremote: {r.name}: tunnel {r.tunnel} after {r.tunnel_attempts} attempt(s): "
                f"{r.tunnel_error}",
                err=True,
            )


@app.command()
def stop(
    name: Annotated[
        str | None,
        typer.Argument(
            help="The session to stop (optional when there is only one).",
            autocompletion=_complete_sessions,
            show_default=False,
        ),
    ] = None,
    all_sessions: Annotated[bool, typer.Option("--all", help="Stop every session.")] = False,
    forget: Annotated[
        bool, typer.Option("--forget", help="Drop the record even if the remote cannot be reached.")
    ] = False,
    grace: Annotated[
        float, typer.Option("--grace", help="Seconds between TERM and KILL on the remote.", min=0)
    ] = 10.0,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Stop a session: its tunnel, exactly its server on the remote, and its files.

    Quiet on success. The remote process is signalled only if its PID, start time and
    command line all still match what was recorded.
    """
    _setup_logging(verbose)
    if name is not None and all_sessions:
        raise _fail(JlremoteError("give a NAME or --all, not both", ExitCode.USAGE))
    from jlremote.commands.stop import stop as do_stop

    outcome = _guarded(do_stop, name, all_sessions, forget, grace)
    if as_json:
        _print_json([r.to_json() for r in outcome.results])
    if outcome.failure is not None:
        raise _fail(outcome.failure)


def _complete_sessions(incomplete: str) -> list[str]:
    """Session names from the state file (for shell completion; never fails)."""
    try:
        from jlremote.paths import state_dir
        from jlremote.state import StateStore

        return sorted(n for n in StateStore(state_dir()).read() if n.startswith(incomplete))
    except Exception:
        return []


def _complete_hosts(incomplete: str) -> list[str]:
    """Host aliases from the ssh configuration and config.toml (for shell completion)."""
    try:
        from jlremote import config, ssh

        names = set(ssh.config_hosts())
        names.update(h for h in config.load().hosts if not any(c in h for c in "*?["))
        return sorted(n for n in names if n.startswith(incomplete))
    except Exception:
        return []


SessionName = Annotated[
    str | None,
    typer.Argument(
        help="The session (optional when there is only one).",
        autocompletion=_complete_sessions,
        show_default=False,
    ),
]


@app.command()
def logs(
    name: SessionName = None,
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="How many of the last lines.", min=0)
    ] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")
    ] = False,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Show the remote server's log (Jupyter's own output; with --slurm, the job's)."""
    _setup_logging(verbose)
    from jlremote.commands import logs as logs_cmd

    if follow:
        if as_json:
            raise _fail(JlremoteError("--follow and --json do not go together", ExitCode.USAGE))
        rc = _guarded(logs_cmd.follow, name, lines)
        raise typer.Exit(rc)
    result = _guarded(logs_cmd.logs, name, lines)
    if as_json:
        _print_json(result.to_json())
    else:
        for line in result.lines:
            typer.echo(clean(line))


@app.command("open")
def open_(
    name: SessionName = None,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Open the session in your browser (`BROWSER` is honoured). The browser is given a
    private local page that redirects to the URL, so the token is in no process's argv."""
    _setup_logging(verbose)
    from jlremote.commands.logs import open_session

    result = _guarded(open_session, name)
    if as_json:
        _print_json(result.to_json())


@app.command()
def doctor(
    host: Annotated[
        str,
        typer.Argument(
            help="The host to check, as you would give it to `start`.",
            autocompletion=_complete_hosts,
            show_default=False,
        ),
    ],
    env: Annotated[
        str | None,
        typer.Option("--env", "-e", help="Shell snippet before jupyter (default: the profile's)."),
    ] = None,
    jupyter: Annotated[
        str | None,
        typer.Option("--jupyter", help="The jupyter executable (default: the profile's)."),
    ] = None,
    use_slurm: Annotated[
        bool | None,
        typer.Option(
            "--slurm/--no-slurm",
            help="Also check what --slurm needs on this login host: sbatch, squeue, scancel, "
            "and the partition --sbatch asks for (default: the profile's).",
        ),
    ] = None,
    sbatch: Annotated[
        str | None, typer.Option("--sbatch", help="sbatch options (default: the profile's).")
    ] = None,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Check everything `start HOST` needs and say what to do about each problem: local
    ssh, the host's configuration, connecting and authenticating without a prompt, the
    remote shell, jupyter and its versions, TCP and Unix-socket forwarding, free space,
    sessions already running, and what other users of the host (with --slurm: of the
    cluster) could reach. Exits non-zero when something `start` needs fails."""
    _setup_logging(verbose)
    from jlremote.commands.doctor import DoctorOptions
    from jlremote.commands.doctor import doctor as do_doctor

    given = {"env": env, "jupyter": jupyter, "slurm": use_slurm, "sbatch": sbatch}
    conf = _profile(host, given)
    result = _guarded(
        do_doctor,
        DoctorOptions(
            host=host,
            env=conf["env"],
            jupyter=conf["jupyter"],
            slurm=conf["slurm"],
            sbatch=conf["sbatch"],
        ),
    )
    if as_json:
        _print_json(result.to_json())
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
        width = max(len(c.name) for c in result.checks)
        for c in result.checks:
            typer.echo(f"{marks[c.status]}  {c.name.ljust(width)}  {c.detail}")
            if c.fix and c.status in ("fail", "warn"):
                typer.echo(f"{' ' * (width + 8)}fix: {c.fix}")
    if result.exit_code:
        raise typer.Exit(result.exit_code)


config_app = typer.Typer(
    help="Profiles: remembered `start` options per host, in config.toml.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    host: Annotated[
        str | None,
        typer.Argument(
            help="Show what `start HOST` would use (default: the global settings).",
            autocompletion=_complete_hosts,
            show_default=False,
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """Print every setting's effective value and where it comes from (the file and its
    table, or `default`)."""
    from jlremote import config

    conf = _guarded(config.load)
    settings = conf.settings(host)
    if as_json:
        _print_json(
            {
                "path": str(conf.path),
                "exists": conf.exists,
                "host": host,
                "settings": {s.key: {"value": s.value, "source": s.source} for s in settings},
            }
        )
        return
    _print_table(
        ("KEY", "VALUE", "SOURCE"),
        [(s.key, json.dumps(s.value), s.source) for s in settings],
    )


COMPLETION_SHELLS = ("bash", "zsh", "fish")


@app.command()
def completion(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the shell completion script for SHELL, e.g. in a dotfiles installer:
    `jlremote completion bash > ~/.local/share/bash-completion/completions/jlremote`.
    Unlike --show-completion, it never guesses the shell from the parent process."""
    if shell not in COMPLETION_SHELLS:
        raise _fail(
            JlremoteError(
                f"completion: SHELL must be bash, zsh or fish, not {shell!r}", ExitCode.USAGE
            )
        )
    # The completion protocol of typer's click: this variable makes it print the script.
    os.environ["_JLREMOTE_COMPLETE"] = f"source_{shell}"
    typer.main.get_command(app).main(
        args=[], prog_name="jlremote", complete_var="_JLREMOTE_COMPLETE"
    )


@config_app.command("path")
def config_path(as_json: Json = False) -> None:
    """Print the path of config.toml (JLREMOTE_CONFIG, else the user config directory)."""
    from jlremote import config

    path = config.config_path()
    if as_json:
        _print_json({"path": str(path), "exists": path.exists()})
    else:
        typer.echo(str(path))


def main() -> None:
    """Console-script entry point."""
    if sys.argv[1:] == ["--version"]:  # fast path: no typer import
        print(f"jlremote {__version__}")
        return
    app()
