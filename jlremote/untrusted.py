"""Values the remote sends back, checked before they are used here.

The remote is another machine: an account there may be compromised, a node may be buggy,
and a shared home may hold what another client (or somebody else) wrote. What it says
becomes an ssh option (a login address, a node name: `%h` in a user's ProxyCommand runs
in a local shell), a local path (a wheel cache), a URL, a PID or something shown on the
terminal. Each such value is checked here against the narrow form it must have; anything
else is refused with one line that names the session (ExitCode.REMOTE_VALUE), before it
is used, and nothing is run or removed because of it.
"""

from __future__ import annotations

import ipaddress
import re

from jlremote.errors import ExitCode, JlremoteError, Reason
from jlremote.terminal import clean

# A host name as DNS and Slurm write it: dot-separated labels of letters, digits, '-' and
# '_' (some clusters name nodes with it), none starting with '-' (an ssh option).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_BOOT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_PLATFORM = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_URL_PATH = re.compile(r"/[A-Za-z0-9_.~/-]{0,255}")
# A remote path that goes into an ssh -L spec (no ':' or space) and is shown.
_SOCKET_PATH = re.compile(r"/[A-Za-z0-9_.+/-]{1,255}")


def refused(session: str, what: str, value: object) -> JlremoteError:
    """The error for VALUE, which the remote sent as WHAT for SESSION."""
    shown = clean(repr(str(value)))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    where = f"session {session}: " if session else ""
    return JlremoteError(
        f"{where}the remote sent a {what} jlremote will not use ({shown}); nothing was done "
        "with it",
        ExitCode.REMOTE_VALUE,
        reason=Reason.REMOTE_VALUE,
    )


def address(value: str, session: str = "") -> str:
    """An IP address literal (as SSH_CONNECTION gives it), in its canonical form."""
    try:
        if "%" in value:  # an IPv6 zone: ssh would expand it as a token
            raise ValueError(value)
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise refused(session, "login address", value) from None


def is_host_name(value: str) -> bool:
    return len(value) <= 253 and _HOST_NAME.fullmatch(value) is not None


def host_name(value: str, session: str = "", what: str = "node name") -> str:
    """A strict host name (a compute node, a login node)."""
    if not is_host_name(value):
        raise refused(session, what, value)
    return value


def remote_host(value: str, session: str = "") -> str:
    """A host as a login node reaches it (a job's node): an IP address or a host name."""
    try:
        return address(value, session)
    except JlremoteError:
        return host_name(value, session, "node address")


def login(value: str, session: str = "") -> str:
    """A login node as `NAME BOOT_ID`."""
    name, _, boot = value.partition(" ")
    if not _BOOT_ID.fullmatch(boot):
        raise refused(session, "login node", value)
    host_name(name, session, "login node")
    return value


def platform_tag(value: str, what: str = "platform") -> str:
    """A part of a local path: `uname -m`, a C library's name."""
    if not _PLATFORM.fullmatch(value) or set(value) == {"."}:
        raise refused("", what, value)
    return value


def number(value: str | int, session: str = "", what: str = "PID", top: int = 2**31 - 1) -> int:
    """A whole number from 1 to TOP (a PID, a port)."""
    text = str(value).strip()
    if not text.isdigit() or not 0 < int(text) <= top or len(text) > 10:
        raise refused(session, what, value)
    return int(text)


def port(value: str | int, session: str = "") -> int:
    return number(value, session, "port", 65535)


def token(value: str, session: str = "") -> str:
    """A server's token (it goes into a URL and a header)."""
    if not _TOKEN.fullmatch(value):
        raise refused(session, "token", "…")  # (never shown)
    return value


def url_path(value: str, session: str = "") -> str:
    """A server's base URL: a plain absolute path."""
    if not _URL_PATH.fullmatch(value) or value.startswith("//"):
        raise refused(session, "base URL", value)
    return value


def socket_path(value: str, session: str = "") -> str:
    """A Unix socket's path on the remote ("" for none)."""
    if value and (not _SOCKET_PATH.fullmatch(value) or "/../" in value + "/"):
        raise refused(session, "socket path", value)
    return value


def text(value: str, limit: int = 300) -> str:
    """Free text from the remote (a Slurm reason, a log line), safe to show."""
    shown = clean(value).replace("\n", " ").replace("\t", " ")
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
