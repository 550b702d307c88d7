"""Through an outage the port stays the user's, and the open page shows no error (#16).

Real parts only: the namespace remote, its link taken down (and its sshd forgetting our
connections, as after a lid closed or a change of Wi-Fi), Debian's Chromium with a
JupyterLab page open, and another local account trying to take the session's port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.harness import browser
from tests.harness.attacker import another_account_tries
from tests.harness.cli import Jl, api, http_get, token_of
from tests.harness.testbed import ALIAS, Testbed, wait_until

pytestmark = pytest.mark.e2e

OUTAGE = 30.0  # seconds the link is away

class Request(threading.Thread):
    """One GET of /api/status, sent now; when it was answered, and how."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.status, self.body, self.at = url, 0, b"", 0.0
        self.start()

    def run(self) -> None:
        self.status, self.body = http_get(api(self.url, "api/status"), token_of(self.url), 300)
        self.at = time.monotonic()


def port_of(url: str) -> int:
    return int(url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def tunnel_pid(jl: Jl) -> int:
    return int(jl.sessions()[ALIAS]["tunnel"]["pid"])


def row(jl: Jl) -> dict:  # type: ignore[type-arg]
    return dict(jl("status", "--offline", "--json").json()[0])


@contextlib.contextmanager
def link_down(testbed: Testbed, drop: bool = False) -> Iterator[float]:
    """The remote's end of the link is down (nothing gets through, as with lost Wi-Fi);
    with DROP, the remote's sshd also forgets our connections. Yields; the link is back
    afterwards, whatever happened. Gives the time it came back (monotonic)."""
    peer = ["ip", "netns", "exec", testbed.netns or "", "ip", "link", "set", testbed.peer]
    subprocess.run([*peer, "down"], check=True)
    back = [0.0]
    try:
        if drop:
            ns = ["ip", "netns", "exec", testbed.netns or ""]
            subprocess.run([*ns, "pkill", "-KILL", "-u", testbed.user, "-x", "sshd"], check=False)
        yield back  # type: ignore[misc]
    finally:
        subprocess.run([*peer, "up"], check=True)
        back[0] = time.monotonic()


def needs_namespace(testbed: Testbed) -> None:
    if testbed.veth is None:
        pytest.skip("needs the network-namespace test bed (root)")


# ---- the page -------------------------------------------------------------------------

NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
        for src in ("x = 6 * 7", "print(x)")
    ],
    "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


def put_notebook(url: str, path: str) -> None:
    body = json.dumps({"type": "notebook", "format": "json", "content": NOTEBOOK}).encode()
    req = urllib.request.Request(
        api(url, f"api/contents/{path}"),
        data=body,
        method="PUT",
        headers={"Authorization": f"token {token_of(url)}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as resp:
        assert resp.status in (200, 201)


def kernel_idle(url: str, path: str) -> bool:
    status, body = http_get(api(url, "api/sessions"), token_of(url), timeout=5)
    if status != 200:
        return False
    return any(
        s.get("path") == path and s["kernel"]["execution_state"] == "idle"
        for s in json.loads(body)
    )


CELL = "document.querySelectorAll('.jp-Notebook .jp-Cell')[{i}]"


def run_cell(page: browser.Browser, i: int) -> None:
    """Select cell I as a user does (a click on its prompt) and press Shift+Enter."""
    page.click(CELL.format(i=i) + ".querySelector('.jp-InputPrompt')")
    page.shift_enter()


def prompt(page: browser.Browser, i: int) -> str:
    return str(page.js(CELL.format(i=i) + ".querySelector('.jp-InputPrompt').textContent"))


def output(page: browser.Browser, i: int) -> str:
    found = page.js(CELL.format(i=i) + ".querySelector('.jp-OutputArea-output')?.textContent")
    return str(found or "")


def dialogs(page: browser.Browser) -> str:
    """The text of every dialog on the page ("" if none)."""
    found = page.js(
        "Array.from(document.querySelectorAll('.jp-Dialog')).map(d => d.innerText).join(' | ')"
    )
    return str(found or "")


def test_an_open_page_rides_out_an_outage(jl: Jl, testbed: Testbed) -> None:
    """A JupyterLab page open through a 30 s outage in which the remote also drops its end:
    afterwards a cell in the same page runs, with the variable set before, and no dialog
    was ever shown; meanwhile no other account could take the port, and `status` said
    `reconnecting` with the connections held."""
    needs_namespace(testbed)
    if browser.executable() is None:
        pytest.fail("no Chromium: `make test` installs Debian's chromium as root")
    url = jl("start", ALIAS).url
    base = url.split("/lab", 1)[0]
    put_notebook(url, "outage.ipynb")
    page = browser.Browser()
    try:
        page.goto(f"{base}/lab/tree/outage.ipynb?token={token_of(url)}")
        wait_until(
            lambda: page.js("document.querySelectorAll('.jp-Notebook .jp-Cell').length") == 2,
            90,
            "the notebook to open in the page",
            interval=0.2,
        )
        wait_until(lambda: kernel_idle(url, "outage.ipynb"), 90, "its kernel", interval=0.2)
        run_cell(page, 0)
        wait_until(lambda: prompt(page, 0) == "[1]:", 60, "the first cell to run", interval=0.1)
        seen: list[str] = []
        with another_account_tries(testbed, port_of(url)), link_down(testbed, drop=True) as back:
            held = Request(url)
            t0 = time.monotonic()
            while time.monotonic() - t0 < OUTAGE:
                said = dialogs(page)
                if said:
                    seen.append(said)
                time.sleep(0.5)  # the scenario itself: the link is away this long
            now = row(jl)
            assert now["tunnel"] in ("reconnecting", "up") and now["held"] >= 1, now
            assert held.at == 0.0  # still waiting, not refused
        held.join(timeout=60)
        assert held.status == 200, held.body[:300]
        print(f"first answer {held.at - back[0]:.2f}s after the link came back")
        run_cell(page, 1)
        wait_until(lambda: "42" in output(page, 1), 60, "the second cell's output", 0.1)
        seen += [d for d in [dialogs(page)] if d]
        assert not seen, f"the page showed: {seen}"
        assert row(jl)["tunnel"] == "up"
    finally:
        page.close()


def test_killed_tunnel_never_frees_the_port(jl: Jl, testbed: Testbed) -> None:
    """kill -9 of the tunnel's ssh, three times: no other account gets the session's port
    (nor its other app's) meanwhile, and a request sent at once is answered (held, then
    carried), not refused."""
    url = jl("start", ALIAS, "--forward", "app=6006").url
    app = jl.sessions()[ALIAS]["forwards"][0]["local_port"]
    with another_account_tries(testbed, port_of(url), f"127.0.0.2:{app}"):
        for _ in range(3):
            old = tunnel_pid(jl)
            os.kill(old, signal.SIGKILL)
            held = Request(url)
            held.join(timeout=30)
            assert held.status == 200, held.body[:300]
            # (it may be carried through the new tunnel a moment before that is recorded)
            wait_until(lambda o=old: tunnel_pid(jl) != o, 10, "the new tunnel to be recorded")
    assert row(jl)["tunnel"] == "up"


def test_past_the_bound_a_held_request_gets_a_page_that_says_why(
    jl: Jl, testbed: Testbed
) -> None:
    """With the tunnel down for longer than a connection may be held (shortened here to
    2 s), the request gets a 503 page naming the host, the attempt and ssh's last error;
    once the link is back the same URL answers."""
    needs_namespace(testbed)
    env = dict(jl.env, JLREMOTE_HOLD_SECONDS="2")
    url = jl("start", ALIAS, env=env).url
    with link_down(testbed):
        os.kill(tunnel_pid(jl), signal.SIGKILL)  # (rather than wait for the keepalives)
        first = Request(url)
        first.join(timeout=30)
        assert first.status == 503
        assert f"reconnecting to {ALIAS}, attempt" in first.body.decode()
        wait_until(lambda: row(jl)["tunnel_error"], 60, "an attempt to fail", interval=0.2)
        later = Request(url)
        later.join(timeout=30)
        assert later.status == 503 and "last error:" in later.body.decode(), later.body
    wait_until(
        lambda: http_get(api(url, "api/status"), token_of(url), 5)[0] == 200,
        30,
        "the URL to answer again",
        interval=0.2,
    )
