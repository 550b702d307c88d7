"""A throwaway "remote" with a real sshd and a real JupyterLab, for tests, demo and bench.

As root: a network namespace joined to us by a veth pair on a private /24, sshd inside it
with its own config and host key, and an unprivileged user; the remote's 127.0.0.1 is not
ours, as on a real remote. Otherwise: sshd on a high loopback port, as the current user.

    python -m tests.harness.testbed up DIR     # bring one up, print how to use it
    python -m tests.harness.testbed down DIR   # tear it down (processes, namespace, user, files)
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
ALIAS = "remote"


def default_remote_venv() -> Path:
    """Where `make` put the remote's JupyterLab (readable by the remote user)."""
    env = os.environ.get("JLREMOTE_TEST_REMOTE_VENV")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/opt/jlremote-testbed/venv")
    return Path(__file__).resolve().parents[2] / ".venv-remote"


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def veth_namespace(netns: str, veth: str, peer: str) -> str:
    """A network namespace NETNS joined to us by a veth pair (VETH here, PEER there) on a
    free /24 of 10.213.x: .1 on our side, .2 on its side; returns the /24's prefix."""
    used = _run(["ip", "-o", "addr"]).stdout
    for _ in range(50):
        net = f"10.213.{random.randrange(1, 254)}"
        if f" {net}." not in used:
            break
    _run(["ip", "netns", "add", netns])
    _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
    _run(["ip", "link", "set", peer, "netns", netns])
    _run(["ip", "addr", "add", f"{net}.1/24", "dev", veth])
    _run(["ip", "link", "set", veth, "up"])
    ns = ["ip", "netns", "exec", netns]
    _run([*ns, "ip", "addr", "add", f"{net}.2/24", "dev", peer])
    _run([*ns, "ip", "link", "set", peer, "up"])
    _run([*ns, "ip", "link", "set", "lo", "up"])
    return net


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class

    """Everything needed to use and to tear down one test remote."""

    workdir: str
    user: str
    remote_ip: str
    port: int
    netns: str | None
    veth: str | None
    created_user: bool
    sshd_pid: int
    remote_venv: str
    # A second sshd, same remote, with stream-local (Unix socket) forwarding turned off.
    nosock_port: int = 0
    nosock_pid: int = 0
    # Another unprivileged user on the remote (root only), for privacy checks.
    other_user: str = ""
    # Accounts with python3 but no Jupyter on their PATH (the private installer's, #15).
    bare_users: tuple[str, ...] = ()
    # An account that logs in by password only (#17), and its password.
    pw_user: str = ""
    pw_password: str = ""
    # A user whose home directory is 100 characters long (root only), as on clusters.
    deep_user: str = ""
    # A local port that the `remote-fwd` alias's own LocalForward asks for (a test holds it).
    busy_port: int = 0

    def __post_init__(self) -> None:
        self.killed_argv: dict[int, str] = {}  # what kill_local_ssh killed, for messages

    @property
    def ssh_config(self) -> str:
        return f"{self.workdir}/ssh_config"

    @property
    def peer(self) -> str:
        """The remote's end of the veth pair (inside the namespace)."""
        return (self.veth or "").replace("jlrh", "jlrr", 1)

    @property
    def unused_ip(self) -> str:
        """An address on our own /24 where nothing answers."""
        return self.remote_ip.rsplit(".", 1)[0] + ".3" if self.netns else "127.0.0.1"

    @property
    def home(self) -> str:
        return pwd.getpwnam(self.user).pw_dir

    # ---- running things "on the remote" -------------------------------------------------
    @property
    def deep_home(self) -> str:
        return pwd.getpwnam(self.deep_user).pw_dir if self.deep_user else ""

    def remote_argv(self, argv: list[str], user: str | None = None) -> list[str]:
        """argv run as the remote user (or USER) inside the remote's network namespace."""
        if self.netns is None:
            return argv
        return ["ip", "netns", "exec", self.netns, "runuser", "-u", user or self.user, "--", *argv]

    def remote_run(
        self, argv: list[str], timeout: float = 60, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.remote_argv(argv, user),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            check=False,
        )

    def remote_popen(
        self, argv: list[str], log: Path, user: str | None = None
    ) -> subprocess.Popen[bytes]:
        out = open(log, "wb")  # noqa: SIM115 - owned by the child
        home = pwd.getpwnam(user).pw_dir if user else self.home
        env = dict(
            os.environ, HOME=home, PATH=f"{self.remote_venv}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        )
        return subprocess.Popen(
            self.remote_argv(argv, user),
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            cwd="/",
            env=env,
            start_new_session=True,
        )

    def remote_pids(self) -> list[int]:
        """PIDs of every process the remote users (ours and the deep-home one) run, except
        sshd's own."""
        pids = []
        users = (self.user, self.deep_user, *self.bare_users, self.pw_user)
        uids = {pwd.getpwnam(u).pw_uid for u in users if u}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid not in uids:
                    continue
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z":  # exited; only waits for init to reap it
                continue
            if cmd.startswith("sshd:") or int(entry.name) == os.getpid():
                continue
            if self.netns is None and ("jupyter" not in cmd and ".jlremote" not in cmd):
                continue  # without root the "remote user" is us: only look at servers
            pids.append(int(entry.name))
        return pids

    def listening(self) -> str:
        """`ss -ltnp` as seen inside the remote."""
        argv = ["ss", "-ltnpH"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return _run(argv).stdout

    # ---- life cycle ----------------------------------------------------------------------
    @classmethod
    def create(cls, workdir: Path | None = None) -> Testbed:
        remote_venv = default_remote_venv()
        if not (remote_venv / "bin" / "jupyter-lab").exists():
            raise RuntimeError(f"no JupyterLab in {remote_venv}: run `make testbed-venv`")
        work = Path(workdir or tempfile.mkdtemp(prefix="jlremote-testbed-"))
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o755)  # sshd reads authorized_keys as the user
        root = os.geteuid() == 0
        tag = f"{random.randrange(16**4):04x}"
        bed = cls(
            workdir=str(work),
            user="",
            remote_ip="127.0.0.1",
            port=22,
            netns=None,
            veth=None,
            created_user=False,
            sshd_pid=0,
            remote_venv=str(remote_venv),
        )
        try:
            if root:
                bed._make_namespace(tag)
                bed.user = f"jlr{tag}"
                _run(["useradd", "-m", "-s", "/bin/bash", bed.user])
                bed.created_user = True
                # "*": no password, but not "locked" (sshd refuses locked accounts).
                _run(["usermod", "-p", "*", bed.user])
                bed.other_user = f"jlo{tag}"
                _run(["useradd", "-m", "-s", "/bin/sh", bed.other_user])
                bed.deep_user = f"jld{tag}"
                deep = bed._deep_home_path(tag)
                Path(deep).parent.mkdir(mode=0o755, parents=True)
                _run(["useradd", "-m", "-d", deep, "-s", "/bin/bash", bed.deep_user])
                _run(["usermod", "-p", "*", bed.deep_user])
                bed.pw_user, bed.pw_password = f"jlp{tag}", f"pw-{os.urandom(8).hex()}"
                _run(["useradd", "-m", "-s", "/bin/bash", bed.pw_user])
                subprocess.run(
                    ["chpasswd"], input=f"{bed.pw_user}:{bed.pw_password}\n", text=True, check=True
                )
                bed.bare_users = (f"jlb{tag}", f"jlc{tag}")
                for bare in bed.bare_users:
                    _run(["useradd", "-m", "-s", "/bin/bash", bare])
                    _run(["usermod", "-p", "*", bare])
                bed.nosock_port = 2222
            else:
                bed.user = pwd.getpwuid(os.getuid()).pw_name
                bed.port = _free_port()
                bed.nosock_port = _free_port()
            bed.busy_port = _free_port()
            bed._write_keys_and_configs()
            bed.sshd_pid = bed.spawn_sshd("sshd_config", bed.port)
            bed.nosock_pid = bed.spawn_sshd("sshd_config_nosock", bed.nosock_port)
        except BaseException:
            bed.close()
            raise
        bed.save()
        return bed

    @staticmethod
    def _deep_home_path(tag: str) -> str:
        """/home/jldTAG-gpfs/projects/.../home/jldTAG, 100 characters in all."""
        top = f"/home/jld{tag}-gpfs/projects/group-abc123/"
        tail = f"/home/jld{tag}"
        return top + "p" * (100 - len(top) - len(tail)) + tail

    def _make_namespace(self, tag: str) -> None:
        self.netns = f"jlr-{tag}"
        self.veth = f"jlrh{tag}"
        self.remote_ip = veth_namespace(self.netns, self.veth, f"jlrr{tag}") + ".2"

    def _write_keys_and_configs(self) -> None:
        w = Path(self.workdir)
        for key in ("host_key", "client_key", "other_key", "wrong_host_key"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(w / key)])
        keys = w / "authorized_keys"
        keys.mkdir(mode=0o755, exist_ok=True)
        for user in filter(None, (self.user, self.deep_user, *self.bare_users)):
            (keys / user).write_text((w / "client_key.pub").read_text())
            os.chmod(keys / user, 0o644)
        pub = (w / "host_key.pub").read_text().split()
        wrong = (w / "wrong_host_key.pub").read_text().split()
        name = self.remote_ip if self.port == 22 else f"[{self.remote_ip}]:{self.port}"
        (w / "known_hosts").write_text(
            f"{name} {pub[0]} {pub[1]}\n[{self.remote_ip}]:{self.nosock_port} {pub[0]} {pub[1]}\n"
        )
        (w / "known_hosts_wrong").write_text(f"{name} {wrong[0]} {wrong[1]}\n")
        path = f"{self.remote_venv}/bin:/usr/local/bin:/usr/bin:/bin"
        users = " ".join(filter(None, (self.user, self.deep_user, *self.bare_users, self.pw_user)))
        # The bare accounts: Debian's python3 on their PATH, no Jupyter anywhere on it.
        bare = (
            f"Match User {','.join(self.bare_users)}\n  SetEnv PATH=/usr/bin:/bin\n"
            if self.bare_users
            else ""
        )
        if self.pw_user:  # a password and nothing else (as a 2FA code would be)
            bare += (
                f"Match User {self.pw_user}\n  PasswordAuthentication yes\n"
                "  PubkeyAuthentication no\n  AuthenticationMethods password\n"
            )
        for conf, port, streamlocal in (
            ("sshd_config", self.port, "yes"),
            ("sshd_config_nosock", self.nosock_port, "no"),
        ):
            (w / conf).write_text(
                f"Port {port}\nListenAddress {self.remote_ip}\nHostKey {w}/host_key\n"
                f"PidFile {w}/{conf}.pid\nAuthorizedKeysFile {w}/authorized_keys/%u\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PubkeyAuthentication yes\nPermitRootLogin no\nUsePAM no\n"
                f"AllowTcpForwarding yes\nAllowStreamLocalForwarding {streamlocal}\n"
                f"X11Forwarding no\nPrintMotd no\nAllowUsers {users}\n"
                "LogLevel VERBOSE\nAllowAgentForwarding yes\n"
                # SLURM_CONF: the test cluster's (tests/harness/slurmbed.py), if one is started.
                f"SetEnv PATH={path} SLURM_CONF={w}/slurm/slurm.conf\n"
                "MaxStartups 100\nMaxSessions 100\n"
                # The work dir lives under /tmp (mode 1777), which StrictModes rejects.
                "StrictModes no\n" + bare
            )
        key = f"  IdentityFile {w}/client_key\n"
        common = (
            f"  User {self.user}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {w}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n"
        )
        (w / "ssh_config").write_text(
            f"Host {ALIAS} {ALIAS}-b {ALIAS}-c\n  HostName {self.remote_ip}\n"
            f"  Port {self.port}\n{key}{common}"
            f"Host unreachable\n  HostName {self.unused_ip}\n"
            f"  Port {22 if self.netns else 1}\n{key}{common}"
            f"Host {ALIAS}-cm\n  HostName {self.remote_ip}\n  Port {self.port}\n{key}"
            f"  ControlMaster auto\n  ControlPath {w}/user-%C\n  ControlPersist 120\n{common}"
            f"Host {ALIAS}-nosock\n  HostName {self.remote_ip}\n  Port {self.nosock_port}\n"
            f"{key}{common}"
            f"Host refused\n  HostName {self.remote_ip}\n  Port 1\n{key}{common}"
            f"Host badkey\n  HostName {self.remote_ip}\n  Port {self.port}\n{key}"
            f"  UserKnownHostsFile {w}/known_hosts_wrong\n{common}"
            f"Host noauth\n  HostName {self.remote_ip}\n  Port {self.port}\n"
            f"  IdentityFile {w}/other_key\n{common}"
            # The user's own forwardings for the host: a LocalForward to a port that is
            # busy, and agent forwarding (jlremote's connections must take neither).
            f"Host {ALIAS}-fwd\n  HostName {self.remote_ip}\n  Port {self.port}\n{key}"
            f"  LocalForward 127.0.0.1:{self.busy_port} 127.0.0.1:22\n  ForwardAgent yes\n"
            f"{common}"
        )
        if self.pw_user:
            with (w / "ssh_config").open("a") as f:
                f.write(
                    f"Host pw\n  HostName {self.remote_ip}\n  Port {self.port}\n"
                    f"  User {self.pw_user}\n  PubkeyAuthentication no\n"
                    "  PreferredAuthentications password\n  NumberOfPasswordPrompts 1\n"
                    f"  UserKnownHostsFile {w}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
                    "  StrictHostKeyChecking yes\n"
                )
        for alias, bare in zip(("bare", "bare2"), self.bare_users, strict=False):
            with (w / "ssh_config").open("a") as f:
                f.write(
                    f"Host {alias}\n  HostName {self.remote_ip}\n  Port {self.port}\n{key}"
                    + common.replace(f"User {self.user}", f"User {bare}")
                )
        if self.deep_user:
            (w / "ssh_config").open("a").write(
                f"Host {ALIAS}-deep\n  HostName {self.remote_ip}\n  Port {self.port}\n{key}"
                + common.replace(f"User {self.user}", f"User {self.deep_user}")
            )

    def spawn_sshd(self, conf: str, port: int, address: str = "") -> int:
        """sshd with WORKDIR/CONF, in the remote's namespace, or with ADDRESS on this side
        of the veth (the Slurm test cluster's compute node); returns once it listens."""
        w = Path(self.workdir)
        argv = [SSHD, "-D", "-e", "-f", f"{w}/{conf}"]
        if self.netns and not address:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log = open(w / f"{conf}.log", "wb")  # noqa: SIM115 - owned by sshd
        proc = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_until(
                lambda: proc.poll() is not None or _port_open(address or self.remote_ip, port),
                10,
                f"sshd ({conf}) to listen",
            )
        except TimeoutError:
            proc.kill()  # not recorded yet: close() would not find it
            proc.wait(10)
            raise
        if proc.poll() is not None:
            raise RuntimeError(f"sshd failed: {(w / f'{conf}.log').read_text()}")
        return proc.pid

    def save(self) -> None:
        (Path(self.workdir) / "testbed.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, workdir: Path) -> Testbed:
        data = json.loads((workdir / "testbed.json").read_text())
        data["bare_users"] = tuple(data.get("bare_users", ()))
        return cls(**data)

    def kill_local_ssh(self, marker: str | None = None) -> list[int]:
        """Kill every local ssh process that uses this testbed's config (tunnels), or whose
        command line mentions `marker` (masters rename themselves `ssh: PATH [mux]`)."""
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = self.ssh_config.encode() in args and args[0].endswith(b"ssh")
            if (
                marker is not None
                and args[0].startswith(b"ssh")
                and marker.encode() in b" ".join(args)
            ):
                ours = True
            if ours:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
                    self.killed_argv[int(entry.name)] = b" ".join(args).decode(errors="replace")
        return killed

    def kill_remote_processes(self) -> list[int]:
        pids = self.remote_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def close(self) -> None:
        """Tear everything down; safe to call twice and on a half-built testbed."""
        with contextlib.suppress(Exception):
            self.kill_local_ssh()
        if self.user:
            with contextlib.suppress(Exception):
                self.kill_remote_processes()
        if self.netns:
            pids = _run(["ip", "netns", "pids", self.netns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for pid in (self.sshd_pid, self.nosock_pid):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        if self.netns:
            _run(["ip", "netns", "del", self.netns], check=False)
            if self.veth:
                _run(["ip", "link", "del", self.veth], check=False)
        if self.created_user:
            pids = self.remote_pids() if self.user else []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _run(["userdel", "-r", "-f", self.user], check=False)
        if self.deep_user:
            deep_top = Path(self._deep_home_path(self.deep_user[3:])).parents[4]
            _run(["pkill", "-KILL", "-u", self.deep_user], check=False)
            _run(["userdel", "-r", "-f", self.deep_user], check=False)
            shutil.rmtree(deep_top, ignore_errors=True)
        for bare in (*self.bare_users, self.pw_user):
            if not bare:
                continue
            _run(["pkill", "-KILL", "-u", bare], check=False)
            _run(["userdel", "-r", "-f", bare], check=False)
        if self.other_user:
            _run(["pkill", "-KILL", "-u", self.other_user], check=False)
            _run(["userdel", "-r", "-f", self.other_user], check=False)
        elif self.user:
            shutil.rmtree(Path(self.home) / ".jlremote" / "sessions", ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    work = Path(sys.argv[2]).resolve()
    if sys.argv[1] == "up":
        if (work / "testbed.json").exists():
            Testbed.load(work).close()
        bed = Testbed.create(work)
        print(f"testbed up: host alias '{ALIAS}' -> {bed.user}@{bed.remote_ip}:{bed.port}")
        print(f"  export JLREMOTE_SSH_CONFIG={bed.ssh_config}")
        return 0
    if (work / "testbed.json").exists():
        Testbed.load(work).close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
