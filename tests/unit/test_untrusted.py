"""What the remote sends back is checked before it is used (jlremote.untrusted), at the
parse and again where an ssh argv is built: exact values in, exact values or one refusal
(exit 11, naming the session) out."""

from __future__ import annotations

import logging

import pytest

from jlremote import install, notify, protocol, remote, slurm, ssh, untrusted
from jlremote.errors import ExitCode, JlremoteError
from jlremote.progress import ProgressLine
from jlremote.terminal import CleanFormatter

SHELL_TEXT = ["x$(>/tmp/pwned)", "a;touch b", "`id`", "1.2.3.4 -oProxyCommand=x", "%h", "-oX"]


@pytest.mark.parametrize("value", ["10.1.2.3", "::1", "fe80::1", "192.168.0.1"])
def test_a_login_address_is_an_ip_literal(value: str) -> None:
    assert untrusted.address(value) == value


@pytest.mark.parametrize(
    "value", [*SHELL_TEXT, "login1", "fe80::1%eth0", "", "1.2.3", "10.0.0.1\n"]
)
def test_anything_else_as_an_address_is_refused(value: str) -> None:
    with pytest.raises(JlremoteError) as err:
        untrusted.address(value, "gpubox")
    assert err.value.code == ExitCode.REMOTE_VALUE
    assert err.value.message.startswith(
        "session gpubox: the remote sent a login address jlremote will not use ("
    )
    assert err.value.message.endswith("); nothing was done with it")
    assert "\n" not in err.value.message


@pytest.mark.parametrize("value", ["node01", "gpu-7.cluster.example.org", "c1_2", "n"])
def test_host_names(value: str) -> None:
    assert untrusted.host_name(value) == value
    assert untrusted.remote_host(value) == value


@pytest.mark.parametrize(
    "value", [*SHELL_TEXT, "", "-node", "node..x", "a b", "node\x1b]0;t\x07", "x" * 254]
)
def test_strange_host_names_are_refused(value: str) -> None:
    with pytest.raises(JlremoteError) as err:
        untrusted.host_name(value, "s")
    assert err.value.code == ExitCode.REMOTE_VALUE
    assert "\x1b" not in err.value.message and "\x07" not in err.value.message


def test_a_login_value_is_checked_word_by_word() -> None:
    assert remote._login("login1 0f-aa 10.0.0.5", "s") == ("login1 0f-aa", "10.0.0.5")
    assert remote._login("", "s") == ("", "")
    for bad in ("login9 boot9 x$(>/tmp/pwned)", "log;in boot 10.0.0.1", "a b c d", "a b$ 1.1.1.1"):
        with pytest.raises(JlremoteError) as err:
            remote._login(bad, "planted")
        assert err.value.code == ExitCode.REMOTE_VALUE
        assert err.value.message.startswith("session planted: the remote sent a login")


@pytest.mark.parametrize("value", ["x86_64", "aarch64", "glibc", "2.36", "ppc64le"])
def test_platform_tags(value: str) -> None:
    assert untrusted.platform_tag(value) == value


@pytest.mark.parametrize("value", ["..", ".", "../../x", "a/b", "x86 64", "", "\x1b[2J"])
def test_a_platform_that_would_leave_the_cache_is_refused(value: str) -> None:
    with pytest.raises(JlremoteError) as err:
        untrusted.platform_tag(value, "machine name")
    assert err.value.code == ExitCode.REMOTE_VALUE


def test_the_installers_probe_refuses_a_machine_name_with_dots() -> None:
    said = "JLREMOTE-PYTHON /usr/bin/python3\nJLREMOTE-VERSION 3.11\nJLREMOTE-MACHINE ..\n"
    said += "JLREMOTE-LIBC glibc 2.36\nJLREMOTE-VENV 1\nJLREMOTE-FREE 100000\n"
    with pytest.raises(JlremoteError) as err:
        install.platform_of(protocol.parse(said).head)
    assert err.value.code == ExitCode.REMOTE_VALUE
    assert "machine name" in err.value.message


def test_numbers_tokens_paths() -> None:
    assert untrusted.number("4242") == 4242 and untrusted.port("8888") == 8888
    for bad in ("0", "-1", "12a", "", "99999999999"):
        with pytest.raises(JlremoteError):
            untrusted.number(bad)
    with pytest.raises(JlremoteError):
        untrusted.port("65536")
    assert untrusted.token("ab12_-Z") == "ab12_-Z"
    with pytest.raises(JlremoteError) as err:
        untrusted.token("abc&next=http://evil/")
    assert "evil" not in err.value.message  # a token is never shown
    assert untrusted.url_path("/user/me/") == "/user/me/"
    for bad in ("//evil.example/", "user", "/a b", "/a?x"):
        with pytest.raises(JlremoteError):
            untrusted.url_path(bad)
    assert untrusted.socket_path("/home/u/.jlremote/s/x/jupyter.sock")
    for bad in ("/a:b", "rel/sock", "/a/../b", "/a b"):
        with pytest.raises(JlremoteError):
            untrusted.socket_path(bad)


def test_a_registry_entry_with_a_strange_address_is_left_out_of_a_listing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reply = protocol.parse(
        "JLREMOTE-ENTRY 0123456789abcdef\nJLREMOTE-NAME planted\nJLREMOTE-KIND lab\n"
        "JLREMOTE-LOGIN login9 boot9 x$(>/tmp/pwned)\n"
        "JLREMOTE-ENTRY 00112233445566ff\nJLREMOTE-NAME fine\nJLREMOTE-KIND lab\n"
        "JLREMOTE-LOGIN login2 boot2 10.0.0.7\n"
    )
    with caplog.at_level(logging.WARNING):
        found = remote.entries_of(reply)
    assert [(e.name, e.login_addr) for e in found] == [("fine", "10.0.0.7")]
    assert [r.getMessage() for r in caplog.records] == [
        "session planted: the remote sent a login address jlremote will not use "
        "('x$(>/tmp/pwned)'); nothing was done with it"
    ]


def test_an_ssh_argv_is_never_built_with_a_strange_address_or_node() -> None:
    cfg = ssh.SshConfig(binary="ssh", pin=("x$(>/tmp/pwned)", "gpubox"))
    with pytest.raises(JlremoteError) as err:
        ssh.command_argv(cfg, "gpubox", "true")
    assert err.value.code == ExitCode.REMOTE_VALUE
    fine = ssh.SshConfig(binary="ssh")
    for build in (
        lambda: ssh.tunnel_master_argv(fine, "login", "/c", "/l", node="n$(id)"),
        lambda: ssh.probe_connect_argv(fine, "login", node="n;id"),
        lambda: ssh.forward_spec(8000, ssh.Target(port=1, host="a:b")),
    ):
        with pytest.raises(JlremoteError) as err:
            build()
        assert err.value.code == ExitCode.REMOTE_VALUE
    pinned = ssh.command_argv(ssh.SshConfig(binary="ssh", pin=("10.0.0.7", "gpubox")), "g", "t")
    assert pinned[:5] == ["ssh", "-o", "HostName=10.0.0.7", "-o", "HostKeyAlias=gpubox"]


def test_slurm_text_is_cleaned_and_a_strange_node_not_used() -> None:
    job = slurm.parse_job_state(
        "PENDING|Priority\x1b]0;owned\x07 \x1b[2J|n$(id)|1:00:00|N/A|jlremote:abc"
    )
    assert job.reason == "Priority "
    assert job.node == ""
    good = slurm.parse_job_state("RUNNING|None|node07|59:00|N/A|jlremote:abc")
    assert (good.state, good.node) == ("RUNNING", "node07")


def test_a_job_poll_refuses_a_strange_node() -> None:
    with pytest.raises(JlremoteError) as err:
        remote._job_poll(protocol.parse("JLREMOTE-NODE n`id` 10.0.0.9\n"), "")
    assert err.value.code == ExitCode.REMOTE_VALUE
    poll = remote._job_poll(protocol.parse("JLREMOTE-NODE node07 10.0.0.9\n"), "")
    assert (poll.node, poll.address) == ("node07", "10.0.0.9")


def test_remote_text_reaching_a_terminal_is_cleaned(capsys: pytest.CaptureFixture[str]) -> None:
    line = ProgressLine(enabled=True)
    line.step("job 7 running on node\x1b]0;owned\x07\x1b[31m7")
    line.close()
    err = capsys.readouterr().err
    assert "owned" not in err and "\x1b]" not in err and "\x1b[31m" not in err
    assert "node7" in err
    record = logging.LogRecord("jlremote", logging.INFO, "", 0, "via %s", ("a\x1b[2Jb",), None)
    assert CleanFormatter("%(message)s").format(record) == "via ab"


def test_the_terminal_fallback_of_notify_is_cleaned(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty = tmp_path / "tty"  # type: ignore[operator]
    tty.write_text("")
    monkeypatch.setattr(notify, "desktop_argv", lambda title, body: None)
    assert notify.tell("jlremote: gpu\x1b]0;x\x07", "runs on n\x1b[2J7", str(tty)) == "bell"
    assert tty.read_bytes() == b"\a\r\njlremote: gpu: runs on n7\r\n"
