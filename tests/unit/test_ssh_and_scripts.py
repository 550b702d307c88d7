"""Unit tests of the pure parts: ssh argv, the remote scripts (run here, under sh and bash)
and the one parser of what they print."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from jlremote import protocol, remote, scripts, ssh
from jlremote.errors import ExitCode, JlremoteError
from jlremote.scripts import LaunchSpec, ServerIdentity

# What every connection of ours says to leave out of the user's config.
PRIVATE = ["-o", "ClearAllForwardings=yes", "-o", "ForwardAgent=no", "-o", "ForwardX11=no"]
CFG = ssh.SshConfig(binary="/usr/bin/ssh", config_file=None, connect_timeout=7)
CFG_F = ssh.SshConfig(binary="/usr/bin/ssh", config_file="/tmp/cfg", connect_timeout=7)
CFG_CM = ssh.SshConfig(binary="/usr/bin/ssh", connect_timeout=7, control_dir="/run/jl")


def test_command_argv() -> None:
    assert ssh.command_argv(CFG, "gpubox", "true") == [
        "/usr/bin/ssh",
        "-T",
        *PRIVATE,
        "-o",
        "ConnectTimeout=7",
        "--",
        "gpubox",
        "true",
    ]
    assert ssh.command_argv(CFG_F, "u@h", "x")[:3] == ["/usr/bin/ssh", "-F", "/tmp/cfg"]
    assert ssh.command_argv(CFG_CM, "gpubox", "true") == [
        "/usr/bin/ssh",
        "-T",
        *PRIVATE,
        "-o",
        "ConnectTimeout=7",
        "-o",
        "ControlMaster=auto",
        "-o",
        "ControlPath=/run/jl/cm-%C",
        "-o",
        "ControlPersist=30",
        "--",
        "gpubox",
        "true",
    ]
    assert ssh.control_exit_argv(CFG_CM, "gpubox") == [
        "/usr/bin/ssh",
        "-o",
        "ControlPath=/run/jl/cm-%C",
        "-O",
        "exit",
        "--",
        "gpubox",
    ]


def test_tunnel_argv() -> None:
    assert ssh.tunnel_master_argv(CFG, "gpubox", "/run/jl/tun-ab", "/s/t.log") == [
        "/usr/bin/ssh",
        "-f",
        "-N",
        "-T",
        "-E",
        "/s/t.log",
        *PRIVATE,
        "-o",
        "ControlMaster=yes",
        "-o",
        "ControlPath=/run/jl/tun-ab",
        "-o",
        "ControlPersist=no",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "StreamLocalBindUnlink=yes",
        "-o",
        "StreamLocalBindMask=0177",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "ConnectTimeout=7",
        "-o",
        "PermitLocalCommand=no",
        "--",
        "gpubox",
    ]
    assert ssh.forward_argv(CFG, "gpubox", "/run/jl/tun-ab", 9000, ssh.Target(34567)) == [
        "/usr/bin/ssh",
        "-F",
        "/dev/null",
        "-o",
        "ControlPath=/run/jl/tun-ab",
        "-O",
        "forward",
        "-L",
        "127.0.0.1:9000:127.0.0.1:34567",
        "--",
        "gpubox",
    ]
    # The session's own forward: from the private socket its port's keeper carries to.
    sock = ssh.Target(socket="/home/u/.jlremote/sessions/ab/jupyter.sock")
    assert ssh.forward_argv(CFG, "gpubox", "/run/jl/tun-ab", "/run/jl/port-9000", sock) == [
        "/usr/bin/ssh", "-F", "/dev/null", "-o", "ControlPath=/run/jl/tun-ab",
        "-O", "forward", "-L", "/run/jl/port-9000:/home/u/.jlremote/sessions/ab/jupyter.sock",
        "--", "gpubox",
    ]  # fmt: skip
    # Another app of the session, to a job's node behind the login host; and its end.
    app = ssh.Target(6006, host="10.1.2.7")
    assert ssh.forward_argv(CFG, "gpubox", "/run/jl/tun-ab", 9001, app, cancel=True) == [
        "/usr/bin/ssh", "-F", "/dev/null", "-o", "ControlPath=/run/jl/tun-ab",
        "-O", "cancel", "-L", "127.0.0.1:9001:10.1.2.7:6006", "--", "gpubox",
    ]  # fmt: skip
    assert ssh.check_master_argv(CFG, "gpubox", "/run/jl/tun-ab") == [
        "/usr/bin/ssh",
        "-F",
        "/dev/null",
        "-o",
        "ControlPath=/run/jl/tun-ab",
        "-O",
        "check",
        "--",
        "gpubox",
    ]


def test_no_option_weakens_host_key_checking() -> None:
    argv = ssh.tunnel_master_argv(CFG, "h", "/p", "/l") + ssh.command_argv(CFG_CM, "h", "c")
    assert not any("StrictHostKeyChecking" in a or "KnownHostsFile" in a for a in argv)


@pytest.mark.parametrize("host", ["-oProxyCommand=x", "", "a b", "-p"])
def test_bad_hosts_are_rejected(host: str) -> None:
    with pytest.raises(JlremoteError) as info:
        ssh.check_host(host)
    assert info.value.code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("stderr", "code", "words"),
    [
        (
            "ssh: Could not resolve hostname nope: Name or service not known",
            ExitCode.CONNECT,
            "cannot resolve host h",
        ),
        ("ssh: connect to host 10.0.0.1 port 22: Connection refused", ExitCode.CONNECT, "refused"),
        (
            "ssh: connect to host 10.0.0.1 port 22: Connection timed out",
            ExitCode.CONNECT,
            "timed out",
        ),
        ("u@h: Permission denied (publickey).", ExitCode.AUTH, "authentication to h failed"),
        (
            "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification "
            "failed.",
            ExitCode.AUTH,
            "host key verification failed",
        ),
        (
            "kex_exchange_identification: read: Connection reset by peer",
            ExitCode.CONNECT,
            "Connection reset by peer",
        ),
    ],
)
def test_explain_failure(stderr: str, code: ExitCode, words: str) -> None:
    err = ssh.explain_failure("h", stderr)
    assert err.code == code and words in err.message


def test_jupyter_argv() -> None:
    assert scripts.jupyter_argv(LaunchSpec("ab" * 8)) == [
        "jupyter",
        "lab",
        "--no-browser",
        "--KernelManager.transport=ipc",
        "--ip=127.0.0.1",
        "--port=0",
    ]
    assert scripts.jupyter_argv(
        LaunchSpec("ab" * 8, notebook=True, port=8888, jupyter="/opt/j", allow_root=True)
    ) == [
        "/opt/j",
        "notebook",
        "--no-browser",
        "--KernelManager.transport=ipc",
        "--ip=127.0.0.1",
        "--port=8888",
        "--allow-root",
    ]


def _run(
    script: scripts.Script, home: Path, stdin: str = "", path: str = ""
) -> subprocess.CompletedProcess[str]:
    """SCRIPT as ssh would run it: its command line, given to a shell."""
    return subprocess.run(
        ["sh", "-c", script.command()],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env={"HOME": str(home), "PATH": path or os.environ["PATH"]},
    )


def test_every_script_parses_under_sh_and_bash() -> None:
    names = sorted(p.stem for p in scripts.SH_DIR.glob("*.sh") if p.stem != "lib")
    assert len(names) >= 13
    for name in names:
        for shell in ("sh", "bash"):
            done = subprocess.run([shell, "-n", "-c", scripts.Script(name).text])
            assert done.returncode == 0, (name, shell)
    assert subprocess.run(["bash", "-n", "-c", scripts.job_text()]).returncode == 0


def test_the_exit_codes_of_lib_sh_are_rc() -> None:
    import re

    named = dict(re.findall(r"^\s*RC_([A-Z_]+)=(\d+)", scripts.source("lib.sh"), re.M))
    assert {k: int(v) for k, v in named.items()} == {rc.name: rc.value for rc in scripts.Rc}
    # and every code has its meaning for the user (remote.OUTCOMES)
    assert set(remote.OUTCOMES) == set(scripts.Rc)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", "/h"),
        ("~", "/h"),
        ("~/proj dir", "/h/proj dir"),
        ("/data/x", "/data/x"),
        ("rel/$(touch pwned)", "/h/rel/$(touch pwned)"),
        ("x'; rm -rf ~; '", "/h/x'; rm -rf ~; '"),
    ],
)
def test_remote_paths_are_literal(path: str, expected: str) -> None:
    text = scripts.source("lib.sh") + '\nremote_path "$1"\n'
    out = subprocess.run(
        ["sh", "-c", text, "sh", path], capture_output=True, text=True, env={"HOME": "/h"}
    )
    assert out.stdout == expected + "\n"


HOSTILE = "x'; touch /tmp/jlremote-pwned; '$(id)"


def test_launch_gets_every_value_as_an_argument_and_never_the_token() -> None:
    spec = LaunchSpec(
        "0123456789abcdef",
        directory=HOSTILE,
        jupyter="/x y/jupyter",
        env="source ~/venv/bin/activate",
        timeout=12,
        name="gpu",
    )
    script = scripts.launch(spec)
    assert script.args == (
        "0123456789abcdef",
        "gpu",
        "lab",
        "0",
        "13",  # 12 s, never early
        "12",
        "tcp",
        "source ~/venv/bin/activate",
        HOSTILE,
        "",  # no --idle-timeout: no watcher
        "",
        "/x y/jupyter",
        "lab",
        "--no-browser",
        "--KernelManager.transport=ipc",
        "--ip=127.0.0.1",
        "--port=0",
    )
    # The text is the same whatever the values: none of them is in it.
    assert script.text == scripts.launch(LaunchSpec("ab" * 8)).text
    # --idle-timeout: its seconds and words, and the watcher's text, as two arguments.
    idle = scripts.launch(replace(spec, idle_seconds=5400, idle_label="1h30m"))
    assert idle.args[9] == "5400 1h30m" and idle.args[10] == scripts.source("idle.py")
    assert idle.args[11:] == script.args[11:]
    assert HOSTILE not in script.text and "~/venv/bin/activate" not in script.text
    assert "read -r t" in script.text  # the token from stdin...
    # ... into a 0600 file the server reads, not into the environment kernels inherit
    assert 'export JUPYTER_TOKEN_FILE="$d/token" JUPYTER_RUNTIME_DIR="$rt"' in script.text


def test_a_hostile_dir_is_only_a_missing_directory(tmp_path: Path) -> None:
    """Run launch for real: the hostile --dir is looked for as a directory, no more."""
    spec = LaunchSpec("0123456789abcdef", directory=HOSTILE, jupyter="true", name="x")
    done = _run(scripts.launch(spec), tmp_path, stdin="tok\n")
    assert done.returncode == scripts.Rc.NO_DIR
    assert done.stderr.startswith(f"jlremote: remote directory not found: {HOSTILE}\n")
    assert not Path("/tmp/jlremote-pwned").exists()
    assert list((tmp_path / ".jlremote" / "sessions").iterdir()) == []  # nothing left


def test_launch_without_a_token_makes_nothing(tmp_path: Path) -> None:
    done = _run(scripts.launch(LaunchSpec("0123456789abcdef", name="x")), tmp_path)
    assert done.returncode == scripts.Rc.NO_TOKEN
    assert list((tmp_path / ".jlremote" / "sessions").iterdir()) == []


def test_bad_session_ids_are_refused() -> None:
    for bad in ("../../etc", "0123456789abcdef\n", "0123456789abcdef\nrm", ""):
        with pytest.raises(ValueError):
            scripts.logs(bad, 5, False)
    for bad in ("12\n", "١٢", "+12", "12 ", ""):
        assert not scripts.is_job_id(bad)
        with pytest.raises(ValueError):
            scripts.check_job_id(bad)
    assert scripts.is_job_id("4711")


def test_the_shell_refuses_a_bad_session_id_too(tmp_path: Path) -> None:
    done = _run(scripts.Script("logs", ("../../etc", "5", "0")), tmp_path)
    assert done.returncode == 2 and "not a session id" in done.stderr


def test_registry_entries_with_bad_ids_are_ignored() -> None:
    entry = (
        "JLREMOTE-ENTRY {}\nJLREMOTE-PID 1\nJLREMOTE-START x\nJLREMOTE-ARGS y\n"
        'JLREMOTE-DIR /d\nJLREMOTE-INFO\n{{"port": 0}}\nJLREMOTE-END\n'
    )
    good = entry.format("0123456789abcdef")
    reply = protocol.parse(good + entry.format("0123456789abcdef/../x"))
    assert [r.session_id for r in remote.entries_of(reply)] == ["0123456789abcdef"]


def test_parse_keeps_records_apart_and_ignores_shell_noise() -> None:
    out = (
        "Welcome to the cluster!\nJLREMOTE-SHELL /bin/bash\nJLREMOTE-V jupyterlab 4.2\n"
        "JLREMOTE-V notebook 7.1\nJLREMOTE-ENV-FAILED\nJLREMOTE-ENTRY ab\nJLREMOTE-NAME n\n"
        "JLREMOTE-INFO\n{}\nJLREMOTE-END\nJLREMOTE-ENTRY cd\nJLREMOTE-NAME m\n"
    )
    reply = protocol.parse(out)
    assert reply.head.get("SHELL") == "/bin/bash"
    assert reply.head.all("V") == ["jupyterlab 4.2", "notebook 7.1"]
    assert reply.head.has("ENV-FAILED") and not reply.head.has("NAME")
    assert [(e.get("ENTRY"), e.get("NAME"), e.info) for e in reply.entries] == [
        ("ab", "n", ["{}"]),
        ("cd", "m", None),
    ]


def test_a_launch_report_ignores_shell_noise() -> None:
    out = (
        "Welcome to the cluster!\nJLREMOTE-WAIT\nJLREMOTE-WAIT\nJLREMOTE-PID 4242\n"
        "JLREMOTE-START Wed Nov 25 21:59:26 2026\nJLREMOTE-ARGS /v/bin/python3 /v/bin/jupyter-lab "
        "--port=0\nJLREMOTE-DIR /home/u/.jlremote/sessions/0123456789abcdef\nJLREMOTE-INFO\n"
        '{\n  "base_url": "/",\n  "port": 40001,\n  "version": "2.21.1"\n}\n\nJLREMOTE-END\n'
    )
    assert remote.report_of(protocol.parse(out).head) == remote.LaunchReport(
        pid=4242,
        started="Wed Nov 25 21:59:26 2026",
        cmdline="/v/bin/python3 /v/bin/jupyter-lab --port=0",
        session_dir="/home/u/.jlremote/sessions/0123456789abcdef",
        port=40001,
        base_url="/",
        version="2.21.1",
    )
    with pytest.raises(JlremoteError):
        remote.report_of(protocol.parse("JLREMOTE-PID 1\n").head)


def test_a_failed_script_becomes_its_exit_code_and_hint() -> None:
    said = "motd\njlremote: 'jupyter' not found on the remote\n"
    err = remote.failure(127, said, "fallback", ExitCode.SERVER)
    assert err.code == ExitCode.REMOTE_ENV and err.remote_code == 127
    assert err.message.startswith("'jupyter' not found on the remote (put it on PATH with --env")
    other = remote.failure(3, "boom\n", "it failed", ExitCode.CONNECT)
    assert (other.message, other.code, other.detail) == ("it failed", ExitCode.CONNECT, "boom")


def _identity_of(pid: int, session_id: str) -> ServerIdentity:
    def ps(fmt: str) -> str:
        return subprocess.run(
            ["ps", "-ww", "-o", f"{fmt}=", "-p", str(pid)],
            capture_output=True,
            text=True,
            env={"TZ": "UTC", "LC_ALL": "C", "PATH": os.environ["PATH"]},
        ).stdout.rstrip("\n")

    return ServerIdentity(session_id, pid, ps("lstart"), ps("args"))


def _probe(servers: list[ServerIdentity], home: Path) -> dict[str, str]:
    reply = protocol.parse(_run(scripts.probe(servers), home).stdout)
    return dict(line.split(" ", 1) for line in reply.head.all("PROBE"))  # type: ignore[misc]


def _stop(server: ServerIdentity, grace: float, home: Path) -> str:
    return protocol.parse(_run(scripts.stop(server, grace), home).stdout).head.get("STOP")


def test_probe_and_stop_scripts_act_only_on_the_recorded_process(tmp_path: Path) -> None:
    sid = "00112233445566ff"
    sdir = tmp_path / ".jlremote" / "sessions" / sid
    sdir.mkdir(parents=True)
    victim = subprocess.Popen(["sleep", "300"])
    stranger = subprocess.Popen(["sleep", "301"])
    try:
        ours = _identity_of(victim.pid, sid)
        # Same PID, other command line: PID reuse must never make us trust it.
        impostor = ServerIdentity(sid, stranger.pid, ours.started, ours.cmdline)
        gone = ServerIdentity("aa" * 8, 2**22 + 1, "x", "y")
        assert _probe([ours, gone], tmp_path) == {sid: "running", "aa" * 8: "gone"}
        assert _probe([impostor], tmp_path) == {sid: "foreign"}
        assert _stop(impostor, 1, tmp_path) == "foreign"
        assert stranger.poll() is None
        sdir.mkdir(parents=True)
        assert _stop(ours, 5, tmp_path) == "stopped"
        assert victim.wait(5) is not None
        assert not sdir.exists()
        assert _stop(ours, 1, tmp_path) == "gone"
    finally:
        for p in (victim, stranger):
            p.kill()
            p.wait()


def test_stop_script_uses_kill_9_only_when_term_is_ignored(tmp_path: Path) -> None:
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"])
    try:
        ident = _identity_of(stubborn.pid, "00112233445566ff")
        assert _stop(ident, 0.5, tmp_path) == "killed"
        assert stubborn.wait(5) == -9
    finally:
        stubborn.kill()
        stubborn.wait()


def test_a_pinned_connection_keeps_the_names_host_key() -> None:
    pinned = ssh.SshConfig(binary="/usr/bin/ssh", pin=("10.0.0.7", "login.cluster.edu"))
    assert ssh.command_argv(pinned, "cluster", "true")[:5] == [
        "/usr/bin/ssh",
        "-o",
        "HostName=10.0.0.7",
        "-o",
        "HostKeyAlias=login.cluster.edu",
    ]
    resolved = "user u\nhostname login.cluster.edu\nport 22\nhostkeyalias none\n"
    assert ssh.host_key_alias(resolved) == "login.cluster.edu"
    assert ssh.host_key_alias(resolved.replace("port 22", "port 2222")) == (
        "[login.cluster.edu]:2222"
    )
    assert ssh.host_key_alias(resolved + "hostkeyalias cluster-key\n") == "login.cluster.edu"
    assert ssh.host_key_alias("hostkeyalias cluster-key\nhostname h\n") == "cluster-key"


def _node_id() -> str:
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{os.uname().nodename} {boot}"


def test_scripts_act_only_on_the_sessions_login_node(tmp_path: Path) -> None:
    """Another login node sharing the home: its entries are reported, never judged or
    removed here; a stop or a probe meant for it does nothing here."""
    sid = "00112233445566ff"
    sdir = tmp_path / ".jlremote" / "sessions" / sid
    sdir.mkdir(parents=True)
    other = "login2 0000-boot"
    for name, text in (
        ("login", f"{other} 10.9.9.9\n"),
        ("name", "gpu\n"),
        ("kind", "lab\n"),
        ("server.pid", "1\n"),  # PID 1 here is not its server: only login2 can tell
        ("server.start", "x\n"),
        ("server.args", "y\n"),
    ):
        (sdir / name).write_text(text)
    listed = remote.entries_of(protocol.parse(_run(scripts.listing(), tmp_path).stdout))
    assert [(e.session_id, e.name, e.here, e.login, e.login_addr) for e in listed] == [
        (sid, "gpu", False, other, "10.9.9.9")
    ]
    assert sdir.exists()
    theirs = ServerIdentity(sid, 1, "x", "y", login=other)
    assert _probe([theirs], tmp_path) == {sid: "elsewhere"}
    done = _run(scripts.stop(theirs, 1), tmp_path)
    assert done.returncode == scripts.Rc.ELSEWHERE and "this is the login node" in done.stderr
    assert sdir.exists()
    assert _run(scripts.logs(sid, 5, False, login=other), tmp_path).returncode == 93
    # Here, the same checks pass through.
    ours = ServerIdentity(sid, 2**22 + 1, "x", "y", login=_node_id())
    assert _probe([ours], tmp_path) == {sid: "gone"}
    hello = protocol.parse(_run(scripts.hello(), tmp_path).stdout).head.get("LOGIN")
    assert hello.startswith(_node_id())


def test_a_host_that_asks_for_a_password_is_told_apart() -> None:
    """In BatchMode ssh says which methods the host still wanted: a password or a code
    means `needs login` (the keeper never asks), a refused key does not."""
    asks = ssh.explain_failure("pw", "jl@h: Permission denied (publickey,password).\n")
    assert asks.code == ExitCode.AUTH and asks.needs_user
    assert "asks for a password or a code" in asks.message
    otp = ssh.explain_failure("hpc", "Permission denied (keyboard-interactive).\n")
    assert otp.needs_user
    key = ssh.explain_failure("gpubox", "u@h: Permission denied (publickey).\n")
    assert key.code == ExitCode.AUTH and not key.needs_user
    batch = ssh.command_argv(replace(CFG, batch=True), "gpubox", "true")
    assert batch[batch.index("BatchMode=yes") - 1] == "-o"
    assert "BatchMode=yes" not in ssh.command_argv(CFG, "gpubox", "true")
