"""The one error type of jlremote and the exit codes it turns into (in cli.py only)."""

from __future__ import annotations

from enum import Enum, IntEnum


class ExitCode(IntEnum):
    """Process exit codes; documented in README.md and docs/pages/troubleshooting.md."""

    OK = 0
    ERROR = 1  # anything not listed below
    USAGE = 2  # bad command line (typer's own code for usage errors)
    NO_SSH = 3  # the local `ssh` binary was not found
    CONNECT = 4  # unknown host, connection refused, timed out
    AUTH = 5  # authentication failed or host key verification failed
    REMOTE_ENV = 6  # jupyter not found on the remote, --dir missing, --env failed
    SERVER = 7  # the server did not come up (crashed or --timeout ran out)
    LOCAL_PORT = 8  # the asked-for local port is busy
    NO_SESSION = 9  # no session of that name
    TUNNEL = 10  # the forward could not be opened or did not answer
    REMOTE_VALUE = 11  # the remote sent a value jlremote will not use (jlremote.untrusted)


class Reason(Enum):
    """Why a failure happened, where the code that meets it must tell it apart (set
    where the failure is classified; never read back from a message's words)."""

    NONE = "none"
    LOCK_BUSY = "lock busy"  # another jlremote holds the lock
    NEEDS_USER = "needs user"  # a login wants a password or a code; nobody may be asked
    REMOTE_VALUE = "remote value"  # the remote sent a value jlremote will not use


class JlremoteError(Exception):
    """An error a user can act on: one line of text plus an exit code."""

    def __init__(
        self,
        message: str,
        code: ExitCode = ExitCode.ERROR,
        detail: str = "",
        remote_code: int = 0,
        needs_user: bool = False,
        reason: Reason = Reason.NONE,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        # Extra lines (e.g. the tail of a remote log) shown after the message.
        self.detail = detail
        # The exit code of the remote script that failed (scripts.Rc), if one did.
        self.remote_code = remote_code
        self.reason = Reason.NEEDS_USER if needs_user else reason

    @property
    def needs_user(self) -> bool:
        """A login that failed because it needs the user (a password or a one-time code)
        where nobody may be asked (BatchMode)."""
        return self.reason is Reason.NEEDS_USER

    def __str__(self) -> str:
        return self.message


class LockBusy(JlremoteError):
    """Another jlremote holds a lock we waited for (the state's, a tunnel's)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.ERROR, reason=Reason.LOCK_BUSY)
