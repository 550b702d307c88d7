"""A private JupyterLab on a remote that has none, also with no internet there.

One probe says the remote's Python, machine and C library. The wheels of JupyterLab (and
of pip, which installs them) for that platform are fetched here, with this machine's own
pip and package index, into a local cache (so a second remote of the same platform costs
only the copy). They go over ssh as one gzipped tar on the ssh command's stdin, and the
remote's install script (jlremote/sh/install.sh) makes a venv under ~/.jlremote/lab/
and installs them with no network. The remote's launch script uses that JupyterLab when
`jupyter` is not on the PATH.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from jlremote import proc, protocol, remote, scripts, ssh, untrusted
from jlremote.errors import ExitCode, JlremoteError

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_PYTHON = (3, 9)
# What an install takes in the remote home (a venv of JupyterLab is about 230 MB).
NEEDS_KB = 400 * 1024
SIZE_WORDS = "about 250 MB"


@dataclass(frozen=True)
class Platform:
    """What the remote's python3 is, and what is installed there already."""

    python: str
    version: tuple[int, int]
    machine: str
    libc: str
    libc_version: str
    venv: bool
    free_kb: int
    installed: tuple[str, ...]

    @property
    def tag(self) -> str:
        """The wheels' platform, as the local cache names it: cp311-x86_64-glibc2.36."""
        return f"cp{self.version[0]}{self.version[1]}-{self.machine}-{self.libc}{self.libc_version}"

    def pip_platforms(self) -> list[str]:
        """pip's --platform values for this remote: every manylinux its glibc runs."""
        minor = int(self.libc_version.split(".")[1])
        return [f"manylinux_2_{m}_{self.machine}" for m in range(minor, 16, -1)] + [
            f"manylinux2014_{self.machine}"
        ]


@dataclass(frozen=True)
class Installed:
    """The result of an install: where, which JupyterLab, how it went."""

    host: str
    path: str
    jupyterlab: str
    python: str
    already: bool  # it was there: nothing was copied
    cached: bool  # the wheels came from the local cache: nothing was downloaded
    seconds: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def probe(cfg: ssh.SshConfig, host: str) -> Platform:
    reply = remote.ask(
        cfg,
        host,
        scripts.Script("pyprobe"),
        cfg.connect_timeout + 30,
        f"looking at python3 on {host}",
        ExitCode.REMOTE_ENV,
    )
    try:
        return platform_of(reply.head)
    except ValueError:
        raise JlremoteError(
            f"could not understand what python3 on {host} said", ExitCode.REMOTE_ENV
        ) from None


def platform_of(head: protocol.Record) -> Platform:
    """The probe's answer as a Platform (ValueError: not understood; values that would
    name a local folder are checked: untrusted)."""
    major, minor = (int(x) for x in head.get("VERSION").split("."))
    libc, _, libc_version = head.get("LIBC").partition(" ")

    def tag(value: str, what: str) -> str:  # (check() says what an empty one means)
        return untrusted.platform_tag(value, what) if value else ""

    return Platform(
        python=head.get("PYTHON"),
        version=(major, minor),
        # These name the local wheel cache's folder (untrusted: no `..`, no `/`).
        machine=tag(head.get("MACHINE"), "machine name"),
        libc=tag(libc, "C library"),
        libc_version=tag(libc_version.strip(), "C library version"),
        venv=head.get("VENV") == "1",
        free_kb=int(head.get("FREE") or 0),
        installed=tuple(head.all("INSTALLED")),
    )


def check(host: str, p: Platform) -> None:
    """Whether a private JupyterLab can be installed there; raises with what to do."""
    if p.version < MIN_PYTHON:
        raise JlremoteError(
            f"python3 on {host} is {p.version[0]}.{p.version[1]}; a private JupyterLab needs "
            "3.9 or newer there (--env can put a newer one on the PATH)",
            ExitCode.REMOTE_ENV,
        )
    if p.libc != "glibc" or not re.fullmatch(r"2\.\d+", p.libc_version):
        raise JlremoteError(
            f"{host} is not a Linux with glibc ({p.libc or 'unknown C library'}): jlremote "
            "installs JupyterLab only there; install it yourself (pip install jupyterlab)",
            ExitCode.REMOTE_ENV,
        )
    if not p.venv:
        raise JlremoteError(
            f"python3 on {host} has no venv module (Debian: apt install python3-venv)",
            ExitCode.REMOTE_ENV,
        )
    if p.free_kb < NEEDS_KB:
        raise JlremoteError(
            f"only {p.free_kb // 1024} MB free in the home on {host}; a private JupyterLab "
            f"takes {SIZE_WORDS}",
            ExitCode.REMOTE_ENV,
        )


def cache_root() -> Path:
    from platformdirs import user_cache_path

    return user_cache_path("jlremote", appauthor=False) / "wheels"


def wheels(p: Platform, progress: Callable[[str], None]) -> tuple[Path, str, bool]:
    """The wheels for P's platform (the cache's, else fetched now): their directory,
    the JupyterLab version among them, and whether they came from the cache."""
    root = cache_root()
    done = root / p.tag
    if (done / "complete").exists():
        return done, _jupyterlab_in(done), True
    progress(f"fetching JupyterLab for Python {p.version[0]}.{p.version[1]} on {p.machine}")
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{p.tag}.{int(time.time() * 1000)}"
    argv = [
        *proc.python_argv("-m", "pip"), "download", "--disable-pip-version-check", "--quiet",
        "--only-binary=:all:", "--python-version", f"{p.version[0]}.{p.version[1]}",
        "--implementation", "cp", "--abi", f"cp{p.version[0]}{p.version[1]}",
        *(w for plat in p.pip_platforms() for w in ("--platform", plat)),
        "--dest", str(work), "jupyterlab", "pip",
    ]  # fmt: skip
    try:
        # In the cache, not the caller's folder: nothing there is imported (proc.python_argv).
        got = proc.run(argv, timeout=900, what="pip download", cwd=root)
        if got.returncode != 0:
            said = [ln for ln in got.stderr.strip().splitlines() if "ERROR" in ln] or [
                got.stderr.strip().splitlines()[-1] if got.stderr.strip() else "pip failed"
            ]
            raise JlremoteError(
                f"could not fetch the wheels for {p.tag} here: {said[-1]}", ExitCode.REMOTE_ENV
            )
        version = _jupyterlab_in(work)
        (work / "complete").write_text(version + "\n")
        shutil.rmtree(done, ignore_errors=True)
        work.rename(done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return done, version, False


def _jupyterlab_in(directory: Path) -> str:
    for wheel in directory.glob("jupyterlab-*.whl"):
        return wheel.name.split("-")[1]
    raise JlremoteError(f"no JupyterLab wheel in {directory}", ExitCode.REMOTE_ENV)


def _tarball(directory: Path) -> bytes:
    """The wheels as one gzipped tar (wheels are zips already: a quick gzip level)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for wheel in sorted(directory.glob("*.whl")):
            tar.add(wheel, arcname=wheel.name)
    return buf.getvalue()


def install(cfg: ssh.SshConfig, host: str, progress: Callable[[str], None]) -> Installed:
    """Set up the private JupyterLab on HOST (nothing if it is there)."""
    t0 = time.monotonic()
    progress(f"looking at python3 on {host}")
    p = probe(cfg, host)
    check(host, p)
    directory, version, cached = wheels(p, progress)
    name = f"jupyterlab-{version}-{p.tag}"
    for path in p.installed:
        if path.rsplit("/", 1)[-1] == name:
            return Installed(host, path, version, p.python, True, cached, 0.0)
    data = _tarball(directory)
    progress(f"copying JupyterLab {version} to {host} ({len(data) // 2**20} MB) and installing it")
    again = f"`jlremote install {host}` tries again"
    try:
        done = remote.run_script(
            cfg,
            host,
            scripts.Script("install", (name, p.python)),
            timeout=cfg.connect_timeout + 900,
            what=f"installing JupyterLab on {host}",
            stdin_text=data,
        )
    except JlremoteError as exc:  # the connection broke: the remote removes the half
        raise JlremoteError(
            f"the copy to {host} was interrupted ({exc.message}); {again}", exc.code
        ) from None
    if done.returncode != 0:
        failed = remote.failure(
            done.returncode, done.stderr, f"installing failed (exit {done.returncode})",
            ExitCode.REMOTE_ENV,
        )  # fmt: skip
        raise JlremoteError(
            f"JupyterLab on {host}: {failed.message}; {again}", failed.code, failed.detail
        )
    path = protocol.parse(done.stdout).head.get("INSTALLED")
    log.info("JupyterLab %s installed on %s in %s", version, host, path)
    return Installed(host, path, version, p.python, False, cached, time.monotonic() - t0)


def uninstall(cfg: ssh.SshConfig, host: str) -> str:
    """Remove the private JupyterLabs on HOST; returns what was removed ("": none)."""
    reply = remote.ask(
        cfg,
        host,
        scripts.Script("uninstall"),
        cfg.connect_timeout + 60,
        f"removing JupyterLab from {host}",
        ExitCode.REMOTE_ENV,
    )
    return reply.head.get("REMOVED")


def standalone(host: str, job: Callable[[ssh.SshConfig], T]) -> T:
    """JOB for `jlremote install|uninstall HOST`: jlremote's shared connection to HOST is
    closed afterwards unless a session of HOST uses it."""
    from jlremote import session as lifecycle
    from jlremote.paths import state_dir
    from jlremote.state import StateStore

    host = ssh.check_host(host)
    cfg = ssh.SshConfig.from_environment()
    try:
        return job(cfg)
    finally:
        lifecycle.release_if_unused(cfg, StateStore(state_dir()), host)
