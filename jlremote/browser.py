"""Opening a session in the browser without putting its token in any argv."""

from __future__ import annotations

import html
import os
import webbrowser
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


def open_url(name: str, url: str) -> Path:
    """Write a 0600 redirect page and hand its file:// address (no token) to the browser."""
    pages = ensure_private_dir(state_dir() / "open")
    page = pages / f"{name}.html"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(redirect_page(url))
    if not webbrowser.open(page.as_uri()):
        raise JlremoteError(
            f"no browser could be started (set BROWSER); the page is {page}", ExitCode.ERROR
        )
    return page
