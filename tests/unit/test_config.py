"""Unit tests of profiles: precedence, host matching, and errors that point at the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from jlremote import config
from jlremote.errors import ExitCode, JlremoteError

TEXT = """\
timeout = 90          # every host
env = "module load python"

[hosts.gpubox]
dir = "~/work"
local_port = 8900

[hosts."hpc-*"]
slurm = true
sbatch = "-p gpu"

[hosts.hpc-login2]
slurm = false
"""


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.load(path)


def test_command_line_beats_host_beats_top_level_beats_default(tmp_path: Path) -> None:
    conf = load(tmp_path, TEXT)
    path = str(tmp_path / "config.toml")
    got = {s.key: (s.value, s.source) for s in conf.settings("gpubox", {"dir": "/data"})}
    assert got["dir"] == ("/data", "command line")
    assert got["local_port"] == (8900, f"{path} [hosts.gpubox]")
    assert got["timeout"] == (90.0, path)
    assert got["env"] == ("module load python", path)
    assert got["jupyter"] == ("jupyter", "default")
    assert list(got) == list(config.KEYS)


def test_exact_host_names_beat_globs(tmp_path: Path) -> None:
    conf = load(tmp_path, TEXT)
    assert conf.effective("hpc-login1", {})["slurm"] is True
    assert conf.effective("hpc-login1", {})["sbatch"] == "-p gpu"
    assert conf.effective("hpc-login2", {})["slurm"] is False
    assert conf.effective("other", {})["slurm"] is False
    # A flag given as False on the command line still beats the profile.
    assert conf.effective("hpc-login1", {"slurm": False})["slurm"] is False


def test_a_missing_file_is_an_empty_config(tmp_path: Path) -> None:
    conf = config.load(tmp_path / "nope.toml")
    assert not conf.exists and conf.effective("x", {})["transport"] == "auto"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hosts.gpubox]\ndir = 3\n", "config.toml, line 2: hosts.gpubox.dir: must be a string"),
        ("notebook = 'yes'\n", "line 1: notebook: must be true or false, not 'yes'"),
        ("port = true\n", "line 1: port: must be a whole number, not True"),
        ("local_port = 70000\n", "line 1: local_port: 70000 is not a port"),
        ("transport = 'udp'\n", "line 1: transport: must be one of auto, socket, tcp"),
        ("timeout = 0\n", "line 1: timeout: must be more than 0 seconds"),
        (
            "x = 1\n[hosts.a]\n\n  jupytr = 'j'\n",
            "line 1: x: unknown key",
        ),
        ("[hosts.a]\n\n  jupytr = 'j'\n", "line 3: hosts.a.jupytr: unknown key (did you mean"),
        ("hosts = 3\n", "hosts: must be a table"),
        ("a = [\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(JlremoteError) as err:
        load(tmp_path, text)
    assert err.value.code == ExitCode.USAGE
    assert str(tmp_path / "config.toml") in err.value.message
    assert message in err.value.message


def test_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JLREMOTE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config.config_path() == tmp_path / "jlremote" / "config.toml"
    monkeypatch.setenv("JLREMOTE_CONFIG", "~/my.toml")
    assert config.config_path() == Path.home() / "my.toml"
