"""Unit tests of the pure Slurm parts: --sbatch parsing, job and submit scripts, parsers."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from jlremote import scripts, slurm, ssh
from jlremote.errors import ExitCode, JlremoteError
from jlremote.scripts import LaunchSpec, ServerIdentity

SID = "0123456789abcdef"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ()),
        ("-p gpu -t 04:00:00 --gres=gpu:1", ("-p", "gpu", "-t", "04:00:00", "--gres=gpu:1")),
        ("--partition gpu --exclusive -N 1", ("--partition", "gpu", "--exclusive", "-N", "1")),
        # Quoting is the user's shell-like quoting; a value with a space stays one word.
        ("-J 'my job; rm -rf ~'", ("-J", "my job; rm -rf ~")),
        ("--constraint='a&b'", ("--constraint=a&b",)),
        # options that only share a first letter with ours are the user's
        ("--export=ALL --exclude=n1", ("--export=ALL", "--exclude=n1")),
        ("--partition=gpu", ("--partition=gpu",)),
    ],
)
def test_sbatch_options_become_separate_words(text: str, words: tuple[str, ...]) -> None:
    assert slurm.parse_sbatch_options(text) == words


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("--wrap=hostname", "may not set --wrap"),
        ("-o out.log", "may not set -o"),
        ("-oout.log", "may not set -oout.log"),
        ("--output=x", "may not set --output"),
        ("--comment x", "may not set --comment"),
        # sbatch takes a unique prefix of a long option for the option itself
        ("--out=x", "may not set --out"),
        ("--comm=x", "may not set --comm"),
        ("--pars", "may not set --pars"),
        ("--err x", "may not set --err"),
        ("--wra=hostname", "may not set --wra"),
        ("job.sh", "options only, not 'job.sh'"),
        ("--exclusive job.sh", "options only, not 'job.sh'"),
        ("-p 'unterminated", "cannot parse --sbatch"),
    ],
)
def test_bad_sbatch_options_are_refused(text: str, words: str) -> None:
    with pytest.raises(JlremoteError) as err:
        slurm.parse_sbatch_options(text)
    assert err.value.code == ExitCode.USAGE and words in err.value.message


def spec(**kw: object) -> LaunchSpec:
    return LaunchSpec(session_id=SID, name="gpu", **kw)  # type: ignore[arg-type]


def test_job_script_serves_on_the_node_address_and_holds_no_token() -> None:
    text = slurm.job_script(spec(notebook=True, allow_root=True, jupyter="/opt/j b/jupyter"))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert lines[-1] == (
        "exec '/opt/j b/jupyter' notebook --no-browser --KernelManager.transport=ipc "
        '--allow-root --ip="$addr" --port=0'
    )
    # The token stays in its 0600 file: not in the environment kernels inherit.
    assert "unset JUPYTER_TOKEN" in lines
    assert 'export JUPYTER_TOKEN_FILE="$d/token" JUPYTER_RUNTIME_DIR="$rt"' in lines
    assert "umask 077" in lines


def test_job_script_runs_env_and_dir_in_the_job() -> None:
    text = slurm.job_script(spec(env="module load python/3.11", directory="my work"))
    assert "{\nmodule load python/3.11\n} </dev/null ||" in text
    assert "cd \"$HOME\"/'my work' ||" in text
    # Everything the user gave is quoted: a hostile directory name stays one word.
    hostile = slurm.job_script(spec(directory="x; touch /tmp/pwned"))
    assert "cd \"$HOME\"/'x; touch /tmp/pwned' ||" in hostile


def test_submit_script_passes_sbatch_options_as_quoted_words() -> None:
    job = slurm.JobSpec(spec(), ("-p", "gpu", "-J", "a b;c", "--gres=gpu:1"))
    text = slurm.submit_script(job)
    sbatch = next(line for line in text.splitlines() if line.startswith("out=$(sbatch"))
    assert sbatch == (
        "out=$(sbatch --job-name=jlremote-gpu -p gpu -J 'a b;c' --gres=gpu:1 --parsable "
        f"--comment=jlremote:{SID} "
        '--output="$d"/server.log "$d"/job.sh "$d" 2>"$d/sbatch.err")'
    )
    assert "IFS= read -r t" in text  # the token comes from stdin into a 0600 file
    assert f'd="$HOME"/.jlremote/sessions/{SID}' in text


def test_submit_script_refuses_to_run_without_a_token(tmp_path: Path) -> None:
    """Run the script for real (sh): no token on stdin, nothing made, nothing submitted."""
    job = slurm.JobSpec(spec(), ())
    done = subprocess.run(
        ["sh", "-c", slurm.submit_script(job)],
        input="",
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=10,
        check=False,
    )
    assert done.returncode == scripts.RC_NO_TOKEN
    assert "no token on stdin" in done.stderr
    assert list((tmp_path / ".jlremote" / "sessions").iterdir()) == []


def test_parse_job_state() -> None:
    assert slurm.parse_job_state("RUNNING|None|node7|3:59:58|jlremote:ab") == slurm.JobState(
        "RUNNING", "", "node7", "3:59:58", "jlremote:ab"
    )
    assert slurm.parse_job_state("PENDING|Priority||UNLIMITED|(null)") == slurm.JobState(
        "PENDING", "Priority", "", "UNLIMITED", ""
    )
    assert slurm.parse_job_state("CANCELLED by 0|None|n|0:00|x").state == "CANCELLED"
    assert slurm.parse_job_state("") == slurm.JobState()
    assert not slurm.JobState().active and slurm.JobState("PENDING").active


def test_parse_poll_output() -> None:
    out = (
        "motd noise\nJLREMOTE-JOBSTATE RUNNING|None|node7|1:00:00|jlremote:ab\n"
        "JLREMOTE-NODE node7 10.1.2.7\nJLREMOTE-INFO\n"
        '{"port": 40123, "hostname": "10.1.2.7", "pid": 99, "base_url": "/"}\n\nJLREMOTE-END\n'
    )
    poll = slurm.parse_poll_output(out)
    assert poll.job.state == "RUNNING" and poll.node == "node7" and poll.address == "10.1.2.7"
    assert poll.info == {"port": 40123, "hostname": "10.1.2.7", "pid": 99, "base_url": "/"}
    half = slurm.parse_poll_output("JLREMOTE-JOBSTATE RUNNING|None|n|1:00|c\nJLREMOTE-INFO\n{")
    assert half.info is None  # still being written


def test_forward_to_a_compute_node_through_the_login_host() -> None:
    node = ssh.Target(port=40123, host="10.1.2.7")
    assert ssh.forward_spec(8888, node) == "127.0.0.1:8888:10.1.2.7:40123"
    v6 = ssh.Target(port=40123, host="fd00::7")
    assert ssh.forward_spec(8888, v6) == "127.0.0.1:8888:[fd00::7]:40123"
    assert ssh.forward_spec(8888, ssh.Target(40123)) == "127.0.0.1:8888:127.0.0.1:40123"
    sock = ssh.Target(socket="/home/u/.jlremote/sessions/ab/jupyter.sock")
    assert (
        ssh.forward_spec(8888, sock) == "127.0.0.1:8888:/home/u/.jlremote/sessions/ab/jupyter.sock"
    )


def test_job_probe_and_stop_check_job_id_and_comment() -> None:
    ident = ServerIdentity(SID, 99, "", "", job_id="42")
    probe = scripts.probe_script([ident])
    assert f"probe_job {SID} 42 jlremote:{SID}" in probe.splitlines()
    stop = scripts.stop_script(ident, grace=2)
    assert f'd="$HOME"/.jlremote/sessions/{SID}; j=42; c=jlremote:{SID}' in stop
    assert '  scancel "$j"; state=stopped; i=0' in stop.splitlines()
    with pytest.raises(ValueError):
        scripts.stop_script(ServerIdentity(SID, 1, "", "", job_id="42; rm -rf ~"))
    assert scripts.parse_probe_jobs(
        f"JLREMOTE-JOB {SID} RUNNING|None|n|1:00|jlremote:{SID}\nJLREMOTE-PROBE {SID} running\n"
    ) == {SID: f"RUNNING|None|n|1:00|jlremote:{SID}"}
    assert shlex.split(probe.splitlines()[-1])[2] == "42"


@pytest.mark.parametrize(
    ("words", "partition"),
    [
        (("-p", "gpu", "-t", "1:00"), "gpu"),
        (("--partition", "gpu"), "gpu"),
        (("--partition=gpu,cpu",), "gpu,cpu"),
        (("-pgpu",), "gpu"),
        (("-t", "1:00"), None),
    ],
)
def test_partition_of(words: tuple[str, ...], partition: str | None) -> None:
    assert slurm.partition_of(words) == partition


@pytest.mark.parametrize(
    ("squeue", "rc", "out"),
    [
        # A state line (a warning before it is not taken for one).
        (
            "echo 'squeue: warning: x' >&2; echo 'RUNNING|None|n1|1:00|c'",
            0,
            "RUNNING|None|n1|1:00|c",
        ),
        # Forgotten by Slurm: nothing, and success.
        ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", 0, ""),
        # The controller does not answer: failure, so that no caller reads "ended".
        (
            "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1",
            1,
            "",
        ),
    ],
)
def test_job_state_tells_forgotten_from_unknown(
    tmp_path: Path, squeue: str, rc: int, out: str
) -> None:
    """The shell function against a stand-in squeue on PATH (the e2e test stops the real
    controller; this pins each answer's meaning)."""
    fake = tmp_path / "squeue"
    fake.write_text(f"#!/bin/sh\n{squeue}\n")
    fake.chmod(0o755)
    done = subprocess.run(
        ["sh", "-c", scripts.JOB_STATE + "job_state 42"],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        timeout=10,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (rc, out)


def test_the_job_waits_for_its_route_and_serves_a_private_socket_when_told() -> None:
    lines = slurm.job_script(spec()).splitlines()
    assert lines[-2] == (
        'if [ "$route" = sock ]; then exec jupyter lab --no-browser '
        '--KernelManager.transport=ipc --sock="$rt"/jupyter.sock; fi'
    )
    assert lines[-1].endswith('--ip="$addr" --port=0')
    assert 'route=$(cat "$d/route" 2>/dev/null)' in lines
    assert slurm.route_script(SID, "sock") == (
        f"umask 077\nprintf '%s\\n' sock > \"$HOME\"/.jlremote/sessions/{SID}/route\n"
    )
    with pytest.raises(ValueError):
        slurm.route_script(SID, "sock; rm -rf ~")


def test_the_tunnel_to_a_node_jumps_through_the_login_host_and_never_prompts() -> None:
    from jlremote import ssh

    cfg = ssh.SshConfig(binary="/usr/bin/ssh", config_file="/a%b c", control_dir="/run/jl")
    argv = ssh.tunnel_master_argv(cfg, "cluster", "/run/jl/tun-x", "/l", node="gpu017")
    # The hop goes through jlremote's own shared connection to the login host when it is
    # up (no second login), never prompts, and carries none of the user's forwardings.
    assert argv[3:7] == [
        "-o",
        "ProxyCommand=/usr/bin/ssh -F '/a%%b c' -o ClearAllForwardings=yes "
        "-o ForwardAgent=no -o ForwardX11=no -o BatchMode=yes -o ControlMaster=no "
        "-o ControlPath=/run/jl/cm-%%C -W %h:%p -- cluster",
        "-o",
        "BatchMode=yes",
    ]
    assert argv[-2:] == ["--", "gpu017"]
    assert ssh.tunnel_master_argv(cfg, "cluster", "/run/jl/tun-x", "/l")[-2:] == ["--", "cluster"]
