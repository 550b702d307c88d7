"""The CLI as a user meets it before any connection: bad input (one line on stderr, the
documented exit code, nothing written), --help, config paths, completion. No remote, no
root: these run everywhere (`make unit`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.cli import Jl, assert_one_error_line


def test_bad_host_argument(cli: Jl) -> None:
    marker = Path(cli.state_dir.parent) / "pwned"
    r = cli("start", f"-oProxyCommand=touch {marker}")  # refused by the option parser
    assert r.rc == 2 and "Traceback" not in r.stderr
    r = cli("start", "--", f"-oProxyCommand=touch {marker}")  # past it: refused by us
    assert r.rc == 2
    assert_one_error_line(r.stderr, "not a valid ssh destination")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port: 70000 is not a port"),
        (["--local-port", "0"], "--local-port: 0 is not a port"),
        (["--transport", "udp"], "--transport: must be one of auto, socket, tcp, not 'udp'"),
        (["--transport", "socket", "--port", "8888"], "--port makes no sense"),
        (["--sbatch", "-p gpu"], "--sbatch needs --slurm"),
        (["--slurm", "--port", "9000"], "--slurm does not go with --port"),
        (["--slurm", "--sbatch", "--output=x"], "--sbatch may not set --output"),
        (["--name", "a b"], "not a valid session name"),
        (["--jupyter", "a\nb"], "--jupyter: a newline"),
        (["--no-wait"], "--no-wait needs --slurm"),
        (["--idle-timeout", "5"], "give a unit"),
        (["--idle-timeout", "3s"], "too short"),
        (["--slurm", "--idle-timeout", "2x"], "not a duration: '2x'"),
    ],
)
def test_bad_start_options_fail_before_any_connection(cli: Jl, args: list[str], words: str) -> None:
    # A host that would hang if it were tried: an address of the test bed's own /24
    # where nothing listens.
    r = cli("start", "10.213.255.254", *args, timeout=20)
    assert r.rc == 2, r.stderr
    assert_one_error_line(r.stderr, words)
    assert r.stdout == ""
    assert not (cli.state_dir / "sessions.json").exists()


def test_unknown_session_names(cli: Jl) -> None:
    r = cli("stop", "nope")
    assert r.rc == 9
    assert_one_error_line(r.stderr, "nope")
    assert cli("status", "nope").rc == 9
    assert cli("logs", "nope").rc == 9
    assert cli("wait", "nope").rc == 9


def test_status_of_nothing_is_quiet(cli: Jl) -> None:
    r = cli("status")
    assert (r.rc, r.stdout, r.stderr) == (0, "", "")
    assert cli("status", "--json").json() == []


def test_config_path_honours_the_environment(cli: Jl, tmp_path: Path) -> None:
    env = dict(cli.env)
    env.pop("JLREMOTE_CONFIG", None)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    assert cli("config", "path", env=env).stdout == f"{tmp_path}/xdg/jlremote/config.toml\n"
    env["JLREMOTE_CONFIG"] = str(tmp_path / "mine.toml")
    assert cli("config", "path", "--json", env=env).json() == {
        "path": str(tmp_path / "mine.toml"),
        "exists": False,
    }


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            '[hosts.remote]\ndir = "a"\nnotebok = true\n',
            ["line 3", "hosts.remote.notebok", "'notebook'"],
        ),
        ('timeout = "soon"\n', ["line 1", "timeout", "must be a number"]),
        ("local_port = 70000\n", ["line 1", "local_port: 70000 is not a port"]),
        ("[hosts.remote\n", ["not valid TOML", "line 1"]),
    ],
)
def test_a_bad_config_file_names_file_line_and_key(
    cli: Jl, tmp_path: Path, text: str, words: list[str]
) -> None:
    (tmp_path / "config.toml").write_text(text)
    r = cli("start", "remote")
    assert r.rc == 2
    assert_one_error_line(r.stderr, str(tmp_path / "config.toml"), *words)
    assert not (cli.state_dir / "sessions.json").exists()


def test_config_show_names_every_key_and_its_source(cli: Jl, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('timeout = 90\n[hosts."hpc-*"]\nslurm = true\n')
    shown = cli("config", "show", "hpc-1", "--json").json()["settings"]
    assert shown["slurm"] == {"value": True, "source": f"{tmp_path}/config.toml [hosts.hpc-*]"}
    assert shown["timeout"] == {"value": 90.0, "source": f"{tmp_path}/config.toml"}
    assert shown["transport"] == {"value": "auto", "source": "default"}
    assert set(shown) == {
        "notebook", "port", "local_port", "dir", "env", "jupyter", "allow_root", "open",
        "timeout", "transport", "slurm", "sbatch", "notify", "idle_timeout", "forwards", "install",
    }  # fmt: skip


def test_every_start_option_is_in_help(cli: Jl) -> None:
    from jlremote.options import OPTIONS

    text = cli("start", "--help", env=dict(cli.env, COLUMNS="200")).stdout
    for o in OPTIONS.values():
        for flag in o.flags[0].split("/"):
            assert flag in text, flag


def test_completion_prints_the_script_for_a_named_shell(cli: Jl) -> None:
    """From a script or a dotfiles installer (no interactive parent shell to guess)."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(cli.env, PATH=f"{bin_dir}:{os.environ['PATH']}")
    for shell, marker in (
        ("bash", "_jlremote_completion()"),
        ("zsh", "#compdef jlremote"),
        ("fish", "complete --command jlremote"),
    ):
        out = subprocess.run(
            ["sh", "-c", f"jlremote completion {shell}"], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0 and marker in out.stdout, out.stderr
    # The bash script really completes: the commands that start with "st".
    script = (
        'eval "$(jlremote completion bash)"; COMP_WORDS=(jlremote st); COMP_CWORD=1; '
        '_jlremote_completion jlremote; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    words = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert set(words.stdout.split()) >= {"start", "status", "stop"}, words.stderr
    bad = cli("completion", "tcsh")
    assert bad.rc == 2
    assert_one_error_line(bad.stderr, "SHELL must be bash, zsh or fish")


def test_start_help_reads_in_panels_at_80_columns(cli: Jl) -> None:
    """One line of help per option, in panels; it fits a terminal (70 lines at most)."""
    text = cli("start", "--help", env=dict(cli.env, COLUMNS="80")).stdout
    lines = text.splitlines()
    assert len(lines) <= 70, len(lines)
    assert max(len(line) for line in lines) <= 80
    panels = [line.split("─ ", 1)[1].split(" ─", 1)[0] for line in lines if line.startswith("╭─ ")]
    assert panels == ["Arguments", "Options", "Server", "Connection", "Cluster", "Apps", "Output"]
