"""Profiles: remembered `start` options, globally and per host, from config.toml.

    # ~/.config/jlremote/config.toml  ($JLREMOTE_CONFIG overrides the path)
    timeout = 90                      # top-level keys: defaults for every host

    [hosts.gpubox]                    # for `jlremote start gpubox`
    env = "source ~/venv/bin/activate"
    dir = "~/projects"

    [hosts."hpc-*"]                   # a glob matches host names too (exact names first)
    slurm = true
    sbatch = "-p gpu -t 04:00:00"

The command line beats the host's table, which beats the top-level keys, which beat
jlremote's defaults. A bad file is an error that names the file, the line and the key.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jlremote import options
from jlremote.errors import ExitCode, JlremoteError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FILE_NAME = "config.toml"


@dataclass(frozen=True)
class Key:
    """One setting a profile may hold: its type, jlremote's own default, and the start
    option it sets (options.py defines them all)."""

    kind: type
    default: Any
    help: str
    option: str


KEYS: dict[str, Key] = {
    key: Key(
        options.OPTIONS[name].kind,
        getattr(options.DEFAULTS[name], "value", options.DEFAULTS[name]),
        options.OPTIONS[name].help,
        name,
    )
    for key, name in options.PROFILE_KEYS.items()
}


def config_path() -> Path:
    """$JLREMOTE_CONFIG, else config.toml in platformdirs' user config dir (which honours
    XDG_CONFIG_HOME on Linux)."""
    override = os.environ.get("JLREMOTE_CONFIG")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_config_path

    return user_config_path("jlremote", appauthor=False) / FILE_NAME


@dataclass(frozen=True)
class Setting:
    """An effective value and where it came from: `command line`, `PATH [hosts.X]`,
    `PATH` (top level) or `default`."""

    key: str
    value: Any
    source: str


@dataclass(frozen=True)
class Config:
    """The parsed file: top-level defaults and the host tables, in file order."""

    path: Path
    exists: bool
    defaults: dict[str, Any]
    hosts: dict[str, dict[str, Any]]

    def host_table(self, host: str) -> tuple[str, dict[str, Any]] | None:
        """The table for HOST: an exact name first, else the first glob that matches."""
        if host in self.hosts:
            return host, self.hosts[host]
        for pattern, table in self.hosts.items():
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(host, pattern):
                return pattern, table
        return None

    def settings(self, host: str | None, given: dict[str, Any] | None = None) -> list[Setting]:
        """Every key's effective value for HOST, with its source. GIVEN holds the values
        set on the command line (None means not given)."""
        table = self.host_table(host) if host else None
        out = []
        for key, spec in KEYS.items():
            if given and given.get(key) is not None:
                out.append(Setting(key, given[key], "command line"))
            elif table is not None and key in table[1]:
                out.append(Setting(key, table[1][key], f"{self.path} [hosts.{table[0]}]"))
            elif key in self.defaults:
                out.append(Setting(key, self.defaults[key], f"{self.path}"))
            else:
                out.append(Setting(key, spec.default, "default"))
        return out

    def effective(self, host: str, given: dict[str, Any]) -> dict[str, Any]:
        return {s.key: s.value for s in self.settings(host, given)}


def load(path: Path | None = None) -> Config:
    """Read and check the config file; a missing file is an empty config."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config(path, False, {}, {})
    except OSError as exc:
        raise JlremoteError(f"cannot read {path}: {exc.strerror}", ExitCode.USAGE) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JlremoteError(f"{path}: not valid TOML: {exc}", ExitCode.USAGE) from None
    defaults: dict[str, Any] = {}
    hosts: dict[str, dict[str, Any]] = {}
    for key, value in doc.items():
        if key == "hosts":
            if not isinstance(value, dict):
                _bad(path, text, None, key, "must be a table of host tables: [hosts.NAME]")
            for host, table in value.items():
                if not isinstance(table, dict):
                    _bad(path, text, None, f"hosts.{host}", "must be a table: [hosts.NAME]")
                hosts[host] = {k: _check(path, text, host, k, v) for k, v in table.items()}
        else:
            defaults[key] = _check(path, text, None, key, value)
    return Config(path, True, defaults, hosts)


def _check(path: Path, text: str, host: str | None, key: str, value: Any) -> Any:
    spec = KEYS.get(key)
    if spec is None:
        import difflib

        close = difflib.get_close_matches(key, KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        _bad(path, text, host, key, f"unknown key ({hint}known keys: {', '.join(KEYS)})")
        raise AssertionError  # unreachable: _bad raises
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, spec.kind) or (spec.kind is int and isinstance(value, bool)):
        want = {
            str: "a string",
            bool: "true or false",
            int: "a whole number",
            float: "a number",
            list: "a list of strings",
        }
        _bad(path, text, host, key, f"must be {want[spec.kind]}, not {value!r}")
    why = options.problem(spec.option, value)
    if why is not None:
        _bad(path, text, host, key, why)
    return value


def _bad(path: Path, text: str, host: str | None, key: str, why: str) -> None:
    line = _line_of(text, host, key)
    where = f"{path}, line {line}" if line else str(path)
    name = f"hosts.{host}.{key}" if host is not None else key
    raise JlremoteError(f"{where}: {name}: {why}", ExitCode.USAGE)


def _line_of(text: str, host: str | None, key: str) -> int | None:
    """The line where KEY is set, in HOST's table (or at the top level). tomllib reports
    no positions for a well-formed file, so this looks for `key =` in the right table."""
    in_table = host is None
    header = re.compile(r"^\s*\[\s*hosts\s*\.\s*(\"[^\"]*\"|'[^']*'|[^\]\s]+)\s*\]")
    key_re = re.compile(rf"^\s*(\"{re.escape(key)}\"|'{re.escape(key)}'|{re.escape(key)})\s*=")
    for number, line in enumerate(text.splitlines(), 1):
        m = header.match(line)
        if m:
            in_table = host is not None and m.group(1).strip("\"'") == host
            continue
        if line.lstrip().startswith("["):
            in_table = False
            continue
        if in_table and key_re.match(line):
            return number
    return None
