"""`make recovery`: how fast a session's URL works again after real faults.

Brings up the test-bed remote, starts one session, and repeats each fault several times:
the session's supervisor killed (-9: its guard brings it back), the tunnel's ssh killed
(-9), the tunnel stopped for 30 s (a sleeping laptop), the remote's link down for 30 s
(lost Wi-Fi; root only), and the same with the remote's sshd dropping our connections
meanwhile (a change of network). Prints median/min/max of the seconds from the fault's
end to the first 200 through the same URL: a request sent at once is held by the
session's port until the tunnel is back, so the time is that of the first answer. A
report, not a test.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness.testbed import ALIAS, Testbed, wait_until

RUNS = int(os.environ.get("RECOVERY_RUNS", "3"))
OUTAGE = float(os.environ.get("RECOVERY_OUTAGE", "30"))


def main() -> int:
    import urllib.request

    bed = Testbed.create()
    state = Path(bed.workdir) / "state"
    env = dict(
        os.environ,
        JLREMOTE_SSH_CONFIG=bed.ssh_config,
        JLREMOTE_STATE_DIR=str(state),
        JLREMOTE_RUNTIME_DIR=str(Path(bed.workdir) / "rt"),
    )
    jl = [sys.executable, "-m", "jlremote"]
    try:
        url = (
            subprocess.run(
                [*jl, "start", ALIAS, "--no-open"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        token = url.split("token=")[1]
        status_url = url.split("/lab?")[0] + "/api/status"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def ok() -> bool:
            req = urllib.request.Request(status_url, headers={"Authorization": f"token {token}"})
            try:
                with opener.open(req, timeout=30) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        def tunnel_pid() -> int:
            doc = json.loads((state / "sessions.json").read_text())
            return int(doc["sessions"][ALIAS]["tunnel"]["pid"])

        def measure(fault: Callable[[], None]) -> float:
            wait_until(ok, 30, "a working URL before the fault")
            fault()
            t0 = time.monotonic()
            wait_until(ok, 60, "recovery", interval=0.05)
            return time.monotonic() - t0

        def kill9() -> None:
            os.kill(tunnel_pid(), signal.SIGKILL)

        def sleep_laptop() -> None:
            pid = tunnel_pid()
            os.kill(pid, signal.SIGSTOP)
            time.sleep(OUTAGE)
            os.kill(pid, signal.SIGCONT)

        def link_outage(drop: bool = False) -> None:
            ns = ["ip", "netns", "exec", bed.netns or ""]
            subprocess.run([*ns, "ip", "link", "set", bed.peer, "down"], check=True)
            if drop:
                subprocess.run([*ns, "pkill", "-KILL", "-u", bed.user, "-x", "sshd"], check=False)
            time.sleep(OUTAGE)
            subprocess.run([*ns, "ip", "link", "set", bed.peer, "up"], check=True)

        def supervisor_pid() -> int:
            doc = json.loads((state / "sessions.json").read_text())
            return int(doc["sessions"][ALIAS]["supervisor_pid"])

        def kill_supervisor() -> None:
            # Its guard holds the port meanwhile and starts a new one.
            old = supervisor_pid()
            os.kill(old, signal.SIGKILL)

        faults: list[tuple[str, Callable[[], None]]] = [
            ("supervisor killed (-9): the port's holder", kill_supervisor),
            ("tunnel ssh killed (-9)", kill9),
            (f"tunnel stopped {OUTAGE:.0f} s (SIGSTOP/SIGCONT)", sleep_laptop),
        ]
        if bed.netns:
            faults.append((f"remote link down {OUTAGE:.0f} s", link_outage))
            faults.append(
                (f"link down {OUTAGE:.0f} s, the remote drops its end", lambda: link_outage(True))
            )
        print(f"runs per fault: {RUNS}\n")
        print("| fault | median s | min s | max s | N |")
        print("|---|---:|---:|---:|---:|")
        for what, fault in faults:
            times = [measure(fault) for _ in range(RUNS)]
            print(
                f"| {what} | {statistics.median(times):.2f} | {min(times):.2f} | "
                f"{max(times):.2f} | {len(times)} |",
                flush=True,
            )
        subprocess.run([*jl, "stop", "--all"], env=env, capture_output=True, check=False)
    finally:
        bed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
