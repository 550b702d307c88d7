"""A second login node beside the test remote, for clusters that publish one name for
several login nodes sharing one home directory (root only).

`login2` is a network namespace of its own (its own /24, its own veth) whose sshd runs in
its own PID and UTS namespaces (`unshare --pid --uts --mount-proc`): another host name,
other PIDs (its processes are not even visible from login1's side), the same users and
the same home directories (the file system is shared, as on a cluster), and the same
host key (one key for all login nodes is common). `cluster` is the published name: its
ProxyCommand stands in for round-robin DNS (a load balancer) and lands each new
connection on the login node that `land(n)` chose (alternating by default); connections
to an address go straight there, as they would with a pinned HostName.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from tests.harness.testbed import Testbed, _run, veth_namespace, wait_until

CLUSTER = "cluster"
PUBLISHED = "jlr-login.cluster.test"  # the name known_hosts holds the key for

# The stand-in for round-robin DNS: argv HOST PORT FILE LOGIN1 LOGIN2. HOST is the
# published name: the next login node (FILE says 1, 2, alt or random); else HOST itself.
RELAY = r"""
import os, random, select, socket, sys
host, port, state, one, two = sys.argv[1:6]
if host == "PUBLISHED":
    try:
        want = open(state).read().strip()
    except OSError:
        want = "random"
    if want == "random":
        want = random.choice("12")
    elif want == "alt":
        n = int(open(state + ".n").read()) if os.path.exists(state + ".n") else 0
        open(state + ".n", "w").write(str(n + 1))
        want = "1" if n % 2 == 0 else "2"
    host = one if want == "1" else two
s = socket.create_connection((host, int(port)), timeout=10)
s.settimeout(None)
fds = [0, s]
while True:
    for r in select.select(fds, [], [])[0]:
        if r == 0:
            data = os.read(0, 65536)
            if not data:
                s.shutdown(socket.SHUT_WR); fds.remove(0); continue
            s.sendall(data)
        else:
            data = s.recv(65536)
            if not data:
                sys.exit(0)
            os.write(1, data)
""".replace("PUBLISHED", PUBLISHED)


class SecondLogin:
    """login2, and the `cluster` alias over both login nodes."""

    def __init__(self, bed: Testbed) -> None:
        assert bed.netns is not None, "needs root (network namespaces)"
        self.bed = bed
        self.tag = f"{random.randrange(16**4):04x}"
        self.netns = f"jlr2-{self.tag}"
        self.veth = f"jlrg{self.tag}"
        self.address = ""
        self.sshd = 0
        self.hostname = f"jlr-login2-{self.tag}"

    @classmethod
    def create(cls, bed: Testbed) -> SecondLogin:
        login = cls(bed)
        try:
            login._network()
            login._sshd()
            login._client_config()
        except BaseException:
            login.close()
            raise
        return login

    def _network(self) -> None:
        net = veth_namespace(self.netns, self.veth, f"jlrq{self.tag}")
        self.address = f"{net}.2"
        ns = ["ip", "netns", "exec", self.netns]
        # This side's addresses (the Slurm test cluster's controller and node) are
        # reachable from login2 too, as a cluster's are from each login node.
        _run([*ns, "ip", "route", "add", "default", "via", f"{net}.1"])

    def _sshd(self) -> None:
        w = Path(self.bed.workdir)
        conf = (w / "sshd_config").read_text()
        conf = conf.replace(f"ListenAddress {self.bed.remote_ip}", f"ListenAddress {self.address}")
        conf = conf.replace(f"PidFile {w}/sshd_config.pid", f"PidFile {w}/sshd_login2.pid")
        (w / "sshd_config_login2").write_text(conf)
        # Its own PID namespace (its processes' PIDs mean nothing on login1) and its own
        # host name; the same file system, users and host key.
        argv = [
            "ip", "netns", "exec", self.netns, "unshare", "--pid", "--uts", "--fork",
            "--mount-proc", "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname,
            "/usr/sbin/sshd", "-D", "-e", "-f", f"{w}/sshd_config_login2",
        ]  # fmt: skip
        log = open(w / "sshd_login2.log", "wb")  # noqa: SIM115 - owned by sshd
        proc = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.sshd = proc.pid
        from tests.harness.testbed import _port_open

        wait_until(
            lambda: proc.poll() is not None or _port_open(self.address, self.bed.port),
            10,
            "login2's sshd to listen",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"login2's sshd failed: {(w / 'sshd_login2.log').read_text()}")

    def _client_config(self) -> None:
        w = Path(self.bed.workdir)
        pub = (w / "host_key.pub").read_text().split()
        name = PUBLISHED if self.bed.port == 22 else f"[{PUBLISHED}]:{self.bed.port}"
        with (w / "known_hosts").open("a") as f:
            f.write(f"{name} {pub[0]} {pub[1]}\n")
        (w / "relay.py").write_text(RELAY)
        proxy = f"{sys.executable} {w}/relay.py %h %p {w}/land {self.bed.remote_ip} {self.address}"
        with (w / "ssh_config").open("a") as f:
            f.write(
                f"Host {CLUSTER}\n  HostName {PUBLISHED}\n  Port {self.bed.port}\n"
                f"  ProxyCommand {proxy}\n  User {self.bed.user}\n"
                f"  IdentityFile {w}/client_key\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {w}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
                "  StrictHostKeyChecking yes\n  BatchMode yes\n"
            )

    def land(self, where: str) -> None:
        """Where the next connections to `cluster` land: "1", "2", "alt" or "random"."""
        (Path(self.bed.workdir) / "land").write_text(where)

    def down(self) -> None:
        """login2 unreachable (its link down); its processes live on."""
        _run(["ip", "link", "set", self.veth, "down"])

    def up(self) -> None:
        _run(["ip", "link", "set", self.veth, "up"])

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """ARGV as the remote user on login2 (in its namespaces)."""
        target = ["nsenter", "-t", str(self._inner_pid()), "-p", "-u", "-n", "-m"]
        return subprocess.run(
            [*target, "runuser", "-u", self.bed.user, "--", *argv],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def _inner_pid(self) -> int:
        """The sshd inside login2's PID namespace (the child of unshare)."""
        kids = Path(f"/proc/{self.sshd}/task/{self.sshd}/children").read_text().split()
        return int(kids[0]) if kids else self.sshd

    def close(self) -> None:
        if self.sshd:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.sshd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.sshd, 0)
        pids = _run(["ip", "netns", "pids", self.netns], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", self.netns], check=False)
        _run(["ip", "link", "del", self.veth], check=False)
