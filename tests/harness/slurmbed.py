"""A real one-node Slurm cluster beside the test remote (tests/harness/testbed.py), for --slurm.

The login host is the test remote (sshd in its network namespace). munged, slurmctld and
slurmd run here, on the host side of the veth pair, so the compute node is reachable from
the login host only by that address: a tunnel that pointed at the login host's own
loopback would find nothing. Jobs run as the remote's unprivileged user. Config, state,
logs and the munge key live in DIR/slurm; nothing is started by systemd.

    python -m tests.harness.slurmbed up DIR     # on a bed from `python -m tests.harness.testbed up`
    python -m tests.harness.slurmbed down DIR
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.harness.testbed import Testbed, wait_until

NODE = "jlrnode"
DAEMONS = ("munged", "slurmctld", "slurmd")


def available() -> str | None:
    """Why a cluster cannot be made here (None when it can)."""
    if os.geteuid() != 0:
        return "a Slurm test cluster needs root (munged and slurmd)"
    missing = [d for d in DAEMONS if not (shutil.which(d) or Path(f"/usr/sbin/{d}").exists())]
    if missing:
        return f"not installed: {' '.join(missing)} (make test installs slurm-wlm and munge)"
    return None


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """One controller and one compute node; everything needed to use and tear it down."""

    workdir: str
    address: str  # the compute node's (and controller's) address, host side of the veth
    user: str
    pids: dict[str, int]

    @property
    def conf(self) -> str:
        return f"{self.workdir}/slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=self.conf)

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A Slurm command here, as root, against this cluster."""
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )

    def jobs(self) -> list[dict[str, str]]:
        """The user's jobs that squeue lists by default (pending, running, completing)."""
        out = self.run("squeue", "-h", "-u", self.user, "-o", "%i|%T|%r|%N|%j").stdout
        keys = ("id", "state", "reason", "node", "name")
        return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]

    def job_state(self, job_id: str) -> str:
        out = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip()
        return out or "FORGOTTEN"

    # ---- life cycle ----------------------------------------------------------------------
    @classmethod
    def create(cls, bed: Testbed) -> Cluster:
        why = available()
        if why:
            raise RuntimeError(why)
        if not bed.netns:
            raise RuntimeError("the Slurm test cluster needs the namespace testbed (root)")
        work = Path(bed.workdir) / "slurm"  # the testbed's sshd passes SLURM_CONF=work/slurm.conf
        for sub in ("munge", "ctld", "spool", "log"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o755)
        os.chmod(work / "munge", 0o755)  # clients (the job user too) connect to its socket
        address = bed.remote_ip.rsplit(".", 1)[0] + ".1"
        cluster = cls(str(work), address, bed.user, {})
        try:
            cluster._write_config()
            cluster._start()
        except BaseException:
            cluster.close()
            raise
        cluster.save()
        return cluster

    def _write_config(self) -> None:
        w = Path(self.workdir)
        key = w / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        host = socket.gethostname().split(".")[0]
        (w / "slurm.conf").write_text(
            "ClusterName=jlremote-test\n"
            f"SlurmctldHost={host}({self.address})\n"
            f"SlurmctldPort={_free_port('0.0.0.0')}\n"
            f"SlurmdPort={_free_port('0.0.0.0')}\n"
            "SlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nAuthInfo=socket={w}/munge/munge.socket.2\n"
            "CredType=cred/munge\n"
            f"StateSaveLocation={w}/ctld\nSlurmdSpoolDir={w}/spool\n"
            f"SlurmctldPidFile={w}/slurmctld.pid\nSlurmdPidFile={w}/slurmd.pid\n"
            f"SlurmctldLogFile={w}/log/slurmctld.log\nSlurmdLogFile={w}/log/slurmd.log\n"
            # No cgroups in a container: track processes by parentage, bind no tasks.
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
            "JobCompType=jobcomp/none\nMpiDefault=none\nMailProg=/bin/true\n"
            "SchedulerType=sched/backfill\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\nSchedulerParameters=batch_sched_delay=0,bf_interval=1\n"
            "SlurmdParameters=config_overrides\nReturnToService=2\nKillWait=5\n"
            "DebugFlags=NO_CONF_HASH\n"
            # Commands give up on a controller that is down after 2 s, not the default 10.
            "MessageTimeout=2\n"
            f"NodeName={NODE} NodeAddr={self.address} CPUs=2 RealMemory=1000 State=UNKNOWN\n"
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n"
            f"PartitionName=closed Nodes={NODE} MaxTime=INFINITE State=DOWN\n"
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(Path(self.workdir) / "log" / f"{name}.out", "wb")  # noqa: SIM115 - owned by it
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        self.pids[name] = proc.pid
        self.save()

    def _start(self) -> None:
        w = Path(self.workdir)
        sock = w / "munge" / "munge.socket.2"
        self._spawn(
            "munged",
            [
                "munged", "-F", "-f", f"--key-file={w}/munge/munge.key", f"--socket={sock}",
                f"--log-file={w}/log/munged.log", f"--pid-file={w}/munge/munged.pid",
                f"--seed-file={w}/munge/seed",
            ],
        )  # fmt: skip
        wait_until(sock.exists, 10, "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", self.conf])
        self._spawn("slurmd", ["slurmd", "-D", "-c", "-N", NODE, "-f", self.conf])

        def idle() -> bool:
            for name, pid in self.pids.items():
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        log = (w / "log" / f"{name}.out").read_text(errors="replace")
                        raise RuntimeError(f"{name} exited: {log[-2000:]}")
            return "idle" in self.run("sinfo", "-h", "-n", NODE, "-o", "%T").stdout

        wait_until(idle, 30, "the Slurm node to be idle", interval=0.1)

    def stop_controller(self) -> None:
        """slurmctld goes away (jobs keep running on the node); start_controller() brings
        it back with its saved state."""
        pid = self.pids.pop("slurmctld")
        os.killpg(pid, signal.SIGTERM)
        wait_until(lambda: _reaped(pid), 30, "slurmctld to exit", interval=0.05)
        self.save()

    def start_controller(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf])  # recovers its state
        wait_until(
            lambda: self.run("sinfo", "-h", "-o", "%T").returncode == 0,
            30,
            "slurmctld to answer",
            interval=0.1,
        )

    def save(self) -> None:
        (Path(self.workdir) / "cluster.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, workdir: Path) -> Cluster:
        return cls(**json.loads((workdir / "cluster.json").read_text()))

    def stepd_pids(self) -> list[int]:
        """slurmstepd processes of this cluster's node (they outlive a killed slurmd)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                if not cmd.startswith(b"slurmstepd"):
                    continue
                if self.workdir in os.readlink(entry / "cwd") or self._spool_open(entry):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def _spool_open(self, entry: Path) -> bool:
        spool = f"{self.workdir}/spool"
        for fd in (entry / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(spool):
                    return True
        return False

    def start_node_sshd(self, bed: Testbed) -> int:
        """An sshd on the compute node for the job's user (clusters that let users ssh to
        the nodes of their jobs); the client reaches it as `jlrnode` through the login
        host (ProxyJump). Returns its PID; stop_node_sshd() ends it."""
        w = Path(bed.workdir)
        port = _free_port(self.address)
        conf = w / "sshd_config_node"
        conf.write_text(
            f"Port {port}\nListenAddress {self.address}\nHostKey {w}/host_key\n"
            f"PidFile {w}/sshd_node.pid\nAuthorizedKeysFile {w}/authorized_keys/%u\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"AllowUsers {bed.user}\nAllowStreamLocalForwarding yes\nStrictModes no\n"
            "X11Forwarding no\nPrintMotd no\nLogLevel VERBOSE\n"
        )
        pub = (w / "host_key.pub").read_text().split()
        with (w / "known_hosts").open("a") as f:
            f.write(f"[{self.address}]:{port} {pub[0]} {pub[1]}\n")
        config = (w / "ssh_config").read_text().split(f"Host {NODE}\n")[0]
        (w / "ssh_config").write_text(
            f"{config}Host {NODE}\n  HostName {self.address}\n  Port {port}\n"
            f"  User {bed.user}\n  IdentityFile {w}/client_key\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {w}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n"
        )
        self.node_sshd = bed.spawn_sshd(conf.name, port, address=self.address)
        return self.node_sshd

    def stop_node_sshd(self) -> None:
        pid = getattr(self, "node_sshd", 0)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_until(lambda: _reaped(pid), 10, "the node's sshd to die", interval=0.05)
            self.node_sshd = 0

    def close(self) -> None:
        """Cancel every job, stop the daemons, remove the files; safe to call twice."""
        self.stop_node_sshd()
        if self.pids.get("slurmctld"):
            with contextlib.suppress(Exception):
                self.run("scancel", "-u", self.user, timeout=10)
                wait_until(lambda: not self.jobs(), 15, "the jobs to end", interval=0.1)
        for pid in self.stepd_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in reversed(DAEMONS):
            pid = self.pids.get(name)
            if not pid:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            try:
                wait_until(lambda p=pid: _reaped(p), 10, f"{name} to exit", interval=0.05)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                wait_until(lambda p=pid: _reaped(p), 10, f"{name} to die", interval=0.05)
        self.pids = {}
        shutil.rmtree(self.workdir, ignore_errors=True)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not our child (a CLI `down`): is it still there?
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    work = Path(sys.argv[2]).resolve()
    state = work / "slurm" / "cluster.json"
    if state.exists():
        Cluster.load(work / "slurm").close()
    if sys.argv[1] == "up":
        cluster = Cluster.create(Testbed.load(work))
        print(f"slurm up: login host 'remote', node {NODE} at {cluster.address}")
        print(f"  export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
