"""The command line: declare the commands, call them, hand their results to render.py, and
turn a JlremoteError into its exit code. The only module that exits."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Annotated, Any, Optional

import typer

from jlremote import __version__, completion, options, render
from jlremote.errors import ExitCode, JlremoteError
from jlremote.options import OUTPUT
from jlremote.terminal import CleanFormatter, clean

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


SessionName = Annotated[
    str | None,
    typer.Argument(
        help="The session (optional when there is only one).",
        autocompletion=completion.sessions,
        show_default=False,
    ),
]


HostName = Annotated[
    str,
    typer.Argument(
        help="The host, as you would give it to `start`.",
        autocompletion=completion.hosts,
        show_default=False,
    ),
]


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger("jlremote")
    if verbose:
        root.setLevel(logging.DEBUG)
    elif root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    if verbose or not root.handlers[0].formatter:
        # -v after the command name comes after the app's own callback: the format too.
        fmt = (
            "jlremote: %(relativeCreated)6.0fms %(message)s" if verbose else "jlremote: %(message)s"
        )
        root.handlers[0].setFormatter(CleanFormatter(fmt))
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


def _start(**given: Any) -> None:
    """Start JupyterLab on HOST (or reuse the running session) and print its URL.

    The URL, with its token, is the only line on stdout (or the JSON with `--json`), so
    `$(jlremote start HOST)` works in scripts. Running it again for a live session prints
    the same URL and starts nothing new. On a terminal, one live line on stderr shows
    what it is doing.
    """
    _setup_logging(given.pop("verbose"))
    from jlremote.commands.start import start as do_start
    from jlremote.progress import ProgressLine
    from jlremote.results import StartResult

    host, quiet, as_json = given.pop("host"), given.pop("quiet"), given.pop("as_json")
    # The command line's values beat the profile's (None: not given there).
    profiled = _profile(host, {o.key: given[name] for name, o in options.OPTIONS.items() if o.key})
    values = {
        name: profiled[o.key] if o.key else given[name] for name, o in options.OPTIONS.items()
    }
    line = ProgressLine(
        enabled=not quiet and not log.isEnabledFor(logging.DEBUG) and sys.stderr.isatty()
    )

    def run(opts: options.StartOptions) -> StartResult:
        try:
            return do_start(opts)
        finally:
            line.close()  # before any error is printed

    opts = options.StartOptions(host=host, **values, progress=line.step, confirm=_confirm(line))
    result: StartResult = _guarded(run, opts)
    _started(result, opts.open_browser, as_json)


def _started(result: Any, open_browser: bool | None, as_json: bool) -> None:
    """A started (or queued) session as the user sees it: the URL alone on stdout, or
    for a queued job its id and state on stderr; or the JSON."""
    if result.queued:
        render.queued(result)
    elif not as_json:
        render.apps_started(result)
    if not result.queued and _want_browser(open_browser):
        from jlremote.browser import open_url

        _guarded(open_url, result.name, result.url)
    if as_json:
        render.print_json(result.to_json())
    elif not result.queued:
        typer.echo(result.url)


def _confirm(line: Any) -> Any:
    """A yes/no question for `start`, asked only with a terminal on stdin and stderr
    (in a script the answer is no)."""

    def ask(question: str) -> bool:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            return False
        line.close()
        return bool(typer.confirm(f"jlremote: {question}", default=False, err=True))

    return ask


# start's output options, after those of StartOptions (in the Output panel).
def _output_option(*flags: str, help: str) -> Any:
    return Annotated[bool, typer.Option(*flags, help=help, rich_help_panel=OUTPUT)]


_START_OUTPUT = (
    ("quiet", _output_option("--quiet", "-q", help="No progress line on stderr.")),
    ("as_json", _output_option("--json", help="Print JSON, not the URL.")),
    ("verbose", _output_option("--verbose", "-v", help="Debug logs (ssh argv included).")),
)


def _start_signature() -> inspect.Signature:
    """start's parameters: HOST, then every option of options.StartOptions (from its
    Opt: flags, help; an option a profile may set defaults to None, "not given"), then
    the output options."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [
        inspect.Parameter(
            "host",
            keyword,
            annotation=Annotated[
                str,
                typer.Argument(
                    help="Anything ssh accepts: an alias from ~/.ssh/config, host, or user@host.",
                    autocompletion=completion.hosts,
                    show_default=False,
                ),
            ],
        )
    ]
    for name, o in options.OPTIONS.items():
        default = None if o.key else options.DEFAULTS[name]
        kind: Any = list[str] if o.kind is list else o.kind
        kind = kind if default is not None else Optional[kind]  # noqa: UP045
        option = typer.Option(
            o.flags[0],
            *o.flags[1:],
            help=o.help,
            min=1 if o.positive else None,
            show_default=False,  # (each help line says its default)
            rich_help_panel=o.panel,
        )
        params.append(
            inspect.Parameter(name, keyword, default=default, annotation=Annotated[kind, option])
        )
    for name, annotation in _START_OUTPUT:
        params.append(inspect.Parameter(name, keyword, default=False, annotation=annotation))
    return inspect.Signature(params)


_start.__signature__ = _start_signature()  # type: ignore[attr-defined]
_start.__annotations__ = {}
app.command("start")(_start)


@app.command()
def install(
    host: HostName,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Set up a private JupyterLab for you on HOST, under ~/.jlremote/lab (nothing outside
    your home), for when `jupyter` is not on its PATH: its wheels are fetched here for
    HOST's Python and platform (and cached), copied over ssh and installed with no network
    on HOST. Prints where. `start` then uses it by itself."""
    _setup_logging(verbose)
    from jlremote import install as installer
    from jlremote.progress import ProgressLine

    line = ProgressLine(enabled=not log.isEnabledFor(logging.DEBUG) and sys.stderr.isatty())

    def run() -> Any:
        try:
            return installer.standalone(host, lambda cfg: installer.install(cfg, host, line.step))
        finally:
            line.close()

    done = _guarded(run)
    if as_json:
        render.print_json(done.to_json())
    else:
        typer.echo(done.path)


@app.command()
def uninstall(
    host: HostName,
    verbose: Verbose = False,
) -> None:
    """Remove the private JupyterLab from HOST (~/.jlremote/lab). Refused while a server
    runs from it; quiet when there is none."""
    _setup_logging(verbose)
    from jlremote import install as installer

    _guarded(installer.standalone, host, lambda cfg: installer.uninstall(cfg, host))


@app.command()
def wait(
    name: SessionName = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            help="Give up after this many seconds (exit 7; the job stays queued). "
            "Default: wait as long as it takes.",
            min=1,
            show_default=False,
        ),
    ] = None,
    open_browser: Annotated[
        bool | None,
        typer.Option("--open/--no-open", help="Open the browser (default: as `start` does)."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress line on stderr.")
    ] = False,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Wait until a session's URL works (its job, queued with `start --no-wait`, runs and
    its server answers), then print it, as `start` does. On a terminal, the live line shows
    Slurm's reason and estimated start. Never starts a server."""
    _setup_logging(verbose)
    from jlremote.commands.wait import wait as do_wait
    from jlremote.progress import ProgressLine

    line = ProgressLine(
        enabled=not quiet and not log.isEnabledFor(logging.DEBUG) and sys.stderr.isatty()
    )

    def run() -> Any:
        try:
            return do_wait(name, timeout, line.step)
        finally:
            line.close()

    _started(_guarded(run), open_browser, as_json)


@app.command()
def forward(
    name: SessionName = None,
    port: Annotated[
        str | None,
        typer.Argument(
            help="[LABEL=][LOCAL:]PORT: PORT beside the server (with --slurm, on its node), "
            "e.g. 6006 or tensorboard=6006; LOCAL is a free local port unless given.",
            show_default=False,
        ),
    ] = None,
    remove: Annotated[
        str | None,
        typer.Option("--remove", help="Stop forwarding this PORT (or LABEL).", show_default=False),
    ] = None,
    as_json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Forward another web app of a running session (TensorBoard, a Dask dashboard,
    Streamlit...) over its tunnel's own connection, and print its local URL; `--remove`
    stops it; with neither, list them. The forwards heal with the tunnel (same local
    ports) and end with `stop`. Nothing needs to listen on PORT yet."""
    _setup_logging(verbose)
    from jlremote.commands.forward import forward as do_forward

    result = _guarded(do_forward, name, port, remove)
    if as_json:
        render.print_json(result.to_json())
    elif remove is None:  # quiet on --remove
        render.forwarded(result)


@app.command()
def status(
    name: Annotated[
        str | None,
        typer.Argument(
            help="Only this session.", autocompletion=completion.sessions, show_default=False
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
    """Show each session: host, server (running, queued, starting, ended, gone or
    unknown), tunnel (up/reconnecting/failed/down/none), URL. A queued job shows Slurm's
    reason and estimated start; a job shows its walltime left (a warning under 10
    minutes); a server that ended by itself says why (`ended: idle for 2h`). `--json`
    adds uptime, transport, who else can connect (exposure: private, host or cluster),
    the server's last activity and the tunnel's reconnection attempts and last error."""
    _setup_logging(verbose)
    if remote_host is not None:
        from jlremote.commands.status import remote_status

        found = _guarded(remote_status, remote_host)
        if as_json:
            render.print_json([r.to_json() for r in found])
        else:
            render.remote_status(found)
        return
    from jlremote.commands.status import status as do_status

    rows = _guarded(do_status, name, offline)
    if as_json:
        render.print_json([r.to_json() for r in rows])
    else:
        render.status(rows)


@app.command()
def stop(
    name: Annotated[
        str | None,
        typer.Argument(
            help="The session to stop (optional when there is only one).",
            autocompletion=completion.sessions,
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
        render.print_json([r.to_json() for r in outcome.results])
    if outcome.failure is not None:
        raise _fail(outcome.failure)


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
        render.print_json(result.to_json())
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
        render.print_json(result.to_json())


@app.command()
def doctor(
    host: Annotated[
        str,
        typer.Argument(
            help="The host to check, as you would give it to `start`.",
            autocompletion=completion.hosts,
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
        render.print_json(result.to_json())
    else:
        render.doctor(result)
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
            autocompletion=completion.hosts,
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
        render.print_json(
            {
                "path": str(conf.path),
                "exists": conf.exists,
                "host": host,
                "settings": {s.key: {"value": s.value, "source": s.source} for s in settings},
            }
        )
        return
    render.settings([(s.key, s.value, s.source) for s in settings])


@app.command("completion")
def completion_(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the shell completion script for SHELL, e.g. in a dotfiles installer:
    `jlremote completion bash > ~/.local/share/bash-completion/completions/jlremote`.
    Unlike --show-completion, it never guesses the shell from the parent process."""
    if shell not in completion.SHELLS:
        raise _fail(
            JlremoteError(
                f"completion: SHELL must be bash, zsh or fish, not {shell!r}", ExitCode.USAGE
            )
        )
    completion.print_script(typer.main.get_command(app), shell)


@config_app.command("path")
def config_path(as_json: Json = False) -> None:
    """Print the path of config.toml (JLREMOTE_CONFIG, else the user config directory)."""
    from jlremote import config

    path = config.config_path()
    if as_json:
        render.print_json({"path": str(path), "exists": path.exists()})
    else:
        typer.echo(str(path))


def main() -> None:
    """Console-script entry point."""
    if sys.argv[1:] == ["--version"]:  # fast path: no typer import
        print(f"jlremote {__version__}")
        return
    app()
