"""Which loopback address serves what, here.

Browsers scope cookies by host, not by port: a page on 127.0.0.1:ANY gets Jupyter's login
cookie and its `_xsrf`. An app forwarded beside Jupyter (`--forward`) may be answered by
whoever holds its port on the remote (with exposure `host` or `cluster`, another user
there), so apps are served from another origin: 127.0.0.2 where this system routes all
of 127.0.0.0/8 to the loopback (Linux, and macOS once `ifconfig lo0 alias 127.0.0.2`),
else `localhost` (a name, so another origin than 127.0.0.1, bound on 127.0.0.1).
"""

from __future__ import annotations

import functools
import socket

JUPYTER = "127.0.0.1"
APPS = "127.0.0.2"


@functools.cache
def app_address() -> str:
    """The address apps' ports are bound on here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((APPS, 0))
        except OSError:
            return JUPYTER
    return APPS


def app_url_host() -> str:
    """How an app's URL names its host: never Jupyter's origin."""
    return APPS if app_address() == APPS else "localhost"
