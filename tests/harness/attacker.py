"""Another local account, as an attacker of the user's session: it tries to take the
session's port (every way a listener can be made) and floods it with idle connections.
Root only (it needs a second account); without root these helpers do nothing and say so."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.harness.testbed import Testbed

PYTHON = "/usr/bin/python3"  # (ours may live in a home the other account cannot read)

# Run as another local account: try to take PORT, every way a listener can be made,
# until the file STOP exists; print the attempts and how many of them got it.
BINDER = r"""
import os, socket, sys, time
stop = sys.argv[1]
ports = [(int(p.rpartition(":")[2]), p.rpartition(":")[0] or "127.0.0.1") for p in sys.argv[2:]]
tries = got = 0
while not os.path.exists(stop):
    for port, addr in [(p, a) for p, mine in ports for a in (mine, "0.0.0.0")]:
        for opt in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, opt, 1)
            tries += 1
            try:
                s.bind((addr, port))
                s.listen(1)
                got += 1
            except OSError:
                pass
            finally:
                s.close()
    time.sleep(0.01)
print(tries, got)
"""


@contextlib.contextmanager
def another_account_tries(testbed: Testbed, *ports: int | str) -> Iterator[None]:
    """Meanwhile, another local account tries to listen on PORTS (a port of 127.0.0.1,
    or `ADDRESS:PORT`, and 0.0.0.0 beside it), all the time; afterwards, every attempt
    must have failed."""
    if os.geteuid() != 0 or not testbed.other_user:
        yield  # (no other account to be without root)
        return
    stop = Path(tempfile.mkdtemp(prefix="jlr-binder-")) / "stop"
    os.chmod(stop.parent, 0o755)
    binder = subprocess.Popen(
        ["runuser", "-u", testbed.other_user, "--", PYTHON, "-c", BINDER, str(stop)]
        + [str(p) for p in ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield
    finally:
        stop.touch()
        out, _ = binder.communicate(timeout=10)
        stop.unlink()
        stop.parent.rmdir()
    words = out.split()
    assert len(words) == 2 and all(w.isdigit() for w in words), out
    tries, got = int(words[0]), int(words[1])
    print(f"another account tried to take ports {ports} {tries} times")
    assert tries > 100 and got == 0, f"another account got one of {ports} {got} times"


# Run as another local account: open N connections to PORT and keep them, idle, until
# the file STOP exists; print how many were opened and how many the far end closed.
FLOOD = r"""
import os, socket, sys, time
stop, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for _ in range(n):
    try:
        conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        break
print(len(conns), flush=True)
while not os.path.exists(stop):
    time.sleep(0.05)
closed = 0
for s in conns:
    s.setblocking(False)
    try:
        closed += s.recv(1) == b""
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print(closed, flush=True)
"""


@contextlib.contextmanager
def another_account_floods(testbed: Testbed, port: int, n: int) -> Iterator[int]:
    """Another local account opens N idle connections to PORT and keeps them open
    meanwhile; yields how many it got."""
    stop = Path(tempfile.mkdtemp(prefix="jlr-flood-")) / "stop"
    os.chmod(stop.parent, 0o755)
    flood = subprocess.Popen(
        [
            "runuser",
            "-u",
            testbed.other_user,
            "--",
            PYTHON,
            "-c",
            FLOOD,
            str(stop),
            str(port),
            str(n),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert flood.stdout is not None
        opened = flood.stdout.readline().strip()
        assert opened.isdigit(), opened + flood.stdout.read()
        yield int(opened)
    finally:
        stop.touch()
        flood.communicate(timeout=30)
        stop.unlink()
        stop.parent.rmdir()
