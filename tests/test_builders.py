"""Unit tests of the pure parts: ssh argv, remote scripts and their parsers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from jlremote import scripts, ssh
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


def _sh_value(expr: str, home: str) -> str:
    out = subprocess.run(
        ["sh", "-c", f"printf %s {expr}"],
        capture_output=True,
        text=True,
        env={"HOME": home, "PATH": os.environ["PATH"]},
        check=True,
    )
    return out.stdout


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("~", "/h"),
        ("~/proj dir", "/h/proj dir"),
        ("/data/x", "/data/x"),
        ("rel/$(touch pwned)", "/h/rel/$(touch pwned)"),
        ("x'; rm -rf ~; '", "/h/x'; rm -rf ~; '"),
    ],
)
def test_remote_paths_are_literal(path: str, expected: str) -> None:
    assert _sh_value(scripts.remote_path_expr(path), "/h") == expected


def test_launch_script_quotes_and_never_holds_the_token() -> None:
    spec = LaunchSpec(
        "0123456789abcdef",
        directory="it's here",
        jupyter="/x y/jupyter",
        env="source ~/venv/bin/activate",
        timeout=12,
    )
    text = scripts.launch_script(spec)
    assert "IFS= read -r t " in text  # from stdin
    # ... into a 0600 file the server reads, not into the environment kernels inherit
    assert 'export JUPYTER_TOKEN_FILE="$d/token" JUPYTER_RUNTIME_DIR="$rt"' in text
    assert "unset JUPYTER_TOKEN\n" in text
    assert (
        "'/x y/jupyter' lab --no-browser --KernelManager.transport=ipc --ip=127.0.0.1 --port=0"
        in text
    )
    assert "\"$HOME\"/'it'\"'\"'s here'" in text
    assert "source ~/venv/bin/activate" in text
    assert "deadline=$(( $(date +%s) + 13 ))" in text  # 12 s, never early
    for shell in ("sh", "bash"):
        assert subprocess.run([shell, "-n", "-c", text]).returncode == 0


def test_bad_session_ids_are_refused() -> None:
    for bad in ("../../etc", "0123456789abcdef\n", "0123456789abcdef\nrm", ""):
        with pytest.raises(ValueError):
            scripts.session_dir_expr(bad)
    for bad in ("12\n", "١٢", "+12", "12 ", ""):
        assert not scripts.is_job_id(bad)
        with pytest.raises(ValueError):
            scripts.check_job_id(bad)
    assert scripts.is_job_id("4711")


def test_registry_entries_with_bad_ids_are_ignored() -> None:
    entry = (
        "JLREMOTE-ENTRY {}\nJLREMOTE-PID 1\nJLREMOTE-START x\nJLREMOTE-ARGS y\n"
        'JLREMOTE-DIR /d\nJLREMOTE-INFO\n{{"port": 0}}\nJLREMOTE-END\n'
    )
    good = entry.format("0123456789abcdef")
    out = scripts.parse_list_output(good + entry.format("0123456789abcdef/../x"))
    assert [r.session_id for r in out] == ["0123456789abcdef"]


def test_mux_clients_read_no_config_and_masters_take_no_user_forwardings() -> None:
    # A `-O forward` client sends the config's LocalForwards too: it reads no config.
    assert ssh.forward_argv(CFG_F, "h", "/run/jl/t", 5000, ssh.Target(port=8888)) == [
        "/usr/bin/ssh",
        "-F",
        "/dev/null",
        "-o",
        "ControlPath=/run/jl/t",
        "-O",
        "forward",
        "-L",
        "127.0.0.1:5000:127.0.0.1:8888",
        "--",
        "h",
    ]
    assert ssh.via_master_argv(CFG_F, "h", "/run/jl/t", "true") == [
        "/usr/bin/ssh",
        "-F",
        "/tmp/cfg",
        "-T",
        *PRIVATE,
        "-o",
        "ControlMaster=no",
        "-o",
        "ControlPath=/run/jl/t",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=7",
        "--",
        "h",
        "true",
    ]


def test_wrap_runs_the_script_verbatim() -> None:
    script = "printf '%s|' \"$0\" 'a b' \"it's\"\n"
    out = subprocess.run(["sh", "-c", scripts.wrap(script)], capture_output=True, text=True)
    assert out.stdout == "bash|a b|it's|"


def test_parse_launch_output_ignores_shell_noise() -> None:
    out = (
        "Welcome to the cluster!\nJLREMOTE-WAIT\nJLREMOTE-WAIT\nJLREMOTE-PID 4242\n"
        "JLREMOTE-START Wed Nov 25 21:59:26 2026\nJLREMOTE-ARGS /v/bin/python3 /v/bin/jupyter-lab "
        "--port=0\nJLREMOTE-DIR /home/u/.jlremote/sessions/0123456789abcdef\nJLREMOTE-INFO\n"
        '{\n  "base_url": "/",\n  "port": 40001,\n  "version": "2.21.1"\n}\n\nJLREMOTE-END\n'
    )
    assert scripts.parse_launch_output(out) == scripts.LaunchReport(
        pid=4242,
        started="Wed Nov 25 21:59:26 2026",
        cmdline="/v/bin/python3 /v/bin/jupyter-lab --port=0",
        session_dir="/home/u/.jlremote/sessions/0123456789abcdef",
        port=40001,
        base_url="/",
        version="2.21.1",
    )
    with pytest.raises(JlremoteError):
        scripts.parse_launch_output("JLREMOTE-PID 1\n")


def _run_locally(script: str, home: Path) -> str:
    return subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
    ).stdout


def _identity_of(pid: int, session_id: str) -> ServerIdentity:
    def ps(fmt: str) -> str:
        return subprocess.run(
            ["ps", "-ww", "-o", f"{fmt}=", "-p", str(pid)],
            capture_output=True,
            text=True,
            env={"TZ": "UTC", "LC_ALL": "C", "PATH": os.environ["PATH"]},
        ).stdout.rstrip("\n")

    return ServerIdentity(session_id, pid, ps("lstart"), ps("args"))


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
        probed = scripts.parse_probe_output(
            _run_locally(scripts.probe_script([ours, gone]), tmp_path)
        )
        assert probed == {sid: "running", "aa" * 8: "gone"}
        assert scripts.parse_probe_output(
            _run_locally(scripts.probe_script([impostor]), tmp_path)
        ) == {sid: "foreign"}

        assert (
            scripts.parse_stop_output(
                _run_locally(scripts.stop_script(impostor, grace=1), tmp_path)
            )
            == "foreign"
        )
        assert stranger.poll() is None
        sdir.mkdir(parents=True)
        assert (
            scripts.parse_stop_output(_run_locally(scripts.stop_script(ours, grace=5), tmp_path))
            == "stopped"
        )
        assert victim.wait(5) is not None
        assert not sdir.exists()
        assert (
            scripts.parse_stop_output(_run_locally(scripts.stop_script(ours, grace=1), tmp_path))
            == "gone"
        )
    finally:
        for p in (victim, stranger):
            p.kill()
            p.wait()


def test_stop_script_uses_kill_9_only_when_term_is_ignored(tmp_path: Path) -> None:
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"])
    try:
        ident = _identity_of(stubborn.pid, "00112233445566ff")
        out = _run_locally(scripts.stop_script(ident, grace=0.5), tmp_path)
        assert scripts.parse_stop_output(out) == "killed"
        assert stubborn.wait(5) == -9
    finally:
        stubborn.kill()
        stubborn.wait()
