"""Opening a session in the browser without putting its token in any argv."""

from __future__ import annotations

import contextlib
import html
import os
from pathlib import Path

from jlremote.errors import ExitCode, JlremoteError
from jlremote.paths import ensure_private_dir, state_dir


def redirect_page(url: str) -> str:
    """A tiny page that sends the browser on to `url` (as Jupyter's own open.html does)."""
    u = html.escape(url, quote=True)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="0;url={u}"><title>jlremote</title></head>'
        f'<body><p><a href="{u}">Open JupyterLab</a></p></body></html>\n'
    )


def page_path(name: str) -> Path:
    """Where the redirect page of session NAME is written (it holds the token)."""
    return state_dir() / "open" / f"{name}.html"


def remove_page(name: str) -> None:
    """The redirect page goes with its session: the token in it must not outlive it."""
    with contextlib.suppress(FileNotFoundError):
        page_path(name).unlink()


def open_url(name: str, url: str) -> Path:
    """Write a 0600 redirect page and hand its file:// address (no token) to the browser."""
    ensure_private_dir(state_dir() / "open")
    page = page_path(name)
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(redirect_page(url))
    import webbrowser

    if not webbrowser.open(page.as_uri()):
        raise JlremoteError(
            f"no browser could be started (set BROWSER); the page is {page}", ExitCode.ERROR
        )
    return page
