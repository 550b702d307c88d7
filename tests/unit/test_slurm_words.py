"""Unit tests of the pure Slurm parts: --sbatch parsing, job and submit scripts, parsers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from jlremote import protocol, remote, scripts, slurm, ssh
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


def test_the_job_script_holds_no_value_and_no_token() -> None:
    text = scripts.job_text()
    assert text.startswith("#!/bin/bash\n")
    # The token stays in its 0600 file: not in the environment kernels inherit.
    assert "unset JUPYTER_TOKEN\n" in text
    assert 'export JUPYTER_TOKEN_FILE="$d/token" JUPYTER_RUNTIME_DIR="$rt"' in text
    assert 'set -- "$@" "--ip=$addr" --port=0' in text
    assert 'set -- "$@" "--sock=$rt/$SOCKET_NAME"' in text
    # The server is the shell's child: Slurm's warning before the time limit reaches the
    # shell (--signal=B:...), which records why and stops the server cleanly.
    assert "trap on_warning USR1" in text and '"$@" </dev/null &' in text


def test_submit_passes_values_and_sbatch_options_as_separate_words() -> None:
    script = scripts.submit(
        spec(env="module load python/3.11", directory="my work", allow_root=True),
        ("-p", "gpu", "-J", "a b;c", "--gres=gpu:1"),
    )
    assert script.args == (
        SID,
        "gpu",
        "lab",
        scripts.job_text(),
        "module load python/3.11",
        "my work",
        "jupyter\nlab\n--no-browser\n--KernelManager.transport=ipc\n--allow-root",
        "120",  # seconds the job waits for its client to say how it is reached
        "",  # no --idle-timeout
        "",
        "-p",
        "gpu",
        "-J",
        "a b;c",
        "--gres=gpu:1",
        "--signal=B:USR1@60",  # the server's clean end before the time limit
    )
    assert "module load" not in script.text and "a b;c" not in script.text
    # --no-wait: the job waits for its client as long as it lasts; the user's own --signal
    # replaces ours; --idle-timeout ships the watcher.
    queued = scripts.submit(
        spec(no_wait=True, idle_seconds=7200, idle_label="2h"), ("--signal=USR2@300",)
    )
    assert queued.args[7:10] == ("0", "7200 2h", scripts.source("idle.py"))
    assert queued.args[10:] == ("--signal=USR2@300",)


def _sbatch_stand_in(tmp_path: Path) -> Path:
    """An sbatch on PATH that records its argv (one word per line) and says job 42."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf \'%s\\n\' "$a"; done > {tmp_path}/argv\necho 42\n'
    )
    fake.chmod(0o755)
    return bin_dir


def test_submit_runs_sbatch_with_each_word_and_leaves_the_job_its_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = _sbatch_stand_in(tmp_path)
    script = scripts.submit(spec(directory="my work"), ("-p", "gpu", "-J", "a b;c"))
    done = subprocess.run(
        ["sh", "-c", script.command()],
        input="tok\n",
        capture_output=True,
        text=True,
        env={"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"},
        timeout=10,
    )
    assert done.returncode == 0, done.stderr
    d = home / ".jlremote" / "sessions" / SID
    assert f"JLREMOTE-JOB 42\nJLREMOTE-DIR {d}\n" == done.stdout
    assert (tmp_path / "argv").read_text().splitlines() == [
        "--job-name=jlremote-gpu",
        "-p",
        "gpu",
        "-J",
        "a b;c",
        "--signal=B:USR1@60",
        "--parsable",
        f"--comment=jlremote:{SID}",
        f"--output={d}/server.log",
        f"{d}/job.sh",
        str(d),
    ]
    assert (d / "token").read_text() == "tok" and (d / "token").stat().st_mode & 0o077 == 0
    assert (d / "job.dir").read_text() == "my work"
    assert (d / "job.argv").read_text().splitlines()[0] == "jupyter"
    assert (d / "job.id").read_text() == "42\n"
    assert (d / "job.route_wait").read_text() == "120\n" and not (d / "idle").exists()


def test_submit_refuses_to_run_without_a_token(tmp_path: Path) -> None:
    """Run the script for real (sh): no token on stdin, nothing made, nothing submitted."""
    done = subprocess.run(
        ["sh", "-c", scripts.submit(spec(), ()).command()],
        input="",
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=10,
        check=False,
    )
    assert done.returncode == scripts.Rc.NO_TOKEN
    assert "no token on stdin" in done.stderr
    assert list((tmp_path / ".jlremote" / "sessions").iterdir()) == []


def test_parse_job_state() -> None:
    running = slurm.parse_job_state("RUNNING|None|node7|3:59:58|2026-12-02T10:00:01|jlremote:ab")
    assert running == slurm.JobState(
        "RUNNING", "", "node7", "3:59:58", "jlremote:ab", "2026-12-02T10:00:01"
    )
    assert running.seconds_left == 3 * 3600 + 59 * 60 + 58 and not running.ending_soon
    pending = slurm.parse_job_state("PENDING|Resources|(null)|UNLIMITED|N/A|(null)")
    assert pending == slurm.JobState("PENDING", "Resources", "", "UNLIMITED", "", "")
    assert pending.queued and pending.seconds_left is None
    assert pending.notes == " (Resources)"
    estimate = slurm.JobState("PENDING", "Priority", start="2026-12-02T14:05:00")
    assert estimate.notes == " (Priority; estimated start 2026-12-02T14:05:00)"
    assert slurm.JobState("PENDING").notes == ""
    assert slurm.parse_job_state("CANCELLED by 0|None|n|0:00|N/A|x").state == "CANCELLED"
    assert slurm.parse_job_state("") == slurm.JobState()
    assert not slurm.JobState().active and slurm.JobState("PENDING").active
    assert not slurm.JobState("RUNNING").queued and not slurm.JobState("CANCELLED").queued
    # Walltime left, as squeue's %L writes it; under 10 minutes is "ending soon".
    for left, secs in (("9:59", 599), ("1:00:00", 3600), ("2-01:00:00", 176400), ("0:05", 5)):
        job = slurm.JobState("RUNNING", time_left=left)
        assert job.seconds_left == secs and job.ending_soon == (secs < 600)
    assert slurm.JobState("RUNNING", time_left="INVALID").seconds_left is None


def test_a_poll_reply() -> None:
    out = (
        "motd noise\nJLREMOTE-JOBSTATE RUNNING|None|node7|1:00:00|N/A|jlremote:ab\n"
        "JLREMOTE-NODE node7 10.1.2.7\nJLREMOTE-INFO\n"
        '{"port": 40123, "hostname": "10.1.2.7", "pid": 99, "base_url": "/"}\n\nJLREMOTE-END\n'
    )
    poll = remote._job_poll(protocol.parse(out), "")
    assert poll.job is not None and poll.job.state == "RUNNING"
    assert (poll.node, poll.address, poll.failed) == ("node7", "10.1.2.7", 0)
    assert poll.info == {"port": 40123, "hostname": "10.1.2.7", "pid": 99, "base_url": "/"}
    half = remote._job_poll(
        protocol.parse("JLREMOTE-JOBSTATE RUNNING|None|n|1:00|N/A|c\nJLREMOTE-INFO\n{"), ""
    )
    assert half.info is None  # still being written
    failed = remote._job_poll(protocol.parse("JLREMOTE-FAILED 127\n"), "jlremote: x\n")
    err = remote.job_failure("42", failed)
    assert err.code == ExitCode.REMOTE_ENV and err.message.startswith("job 42: x (put it on")


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


def test_job_probe_and_stop_take_job_id_and_refuse_anything_else() -> None:
    ident = ServerIdentity(SID, 99, "", "", job_id="42")
    assert scripts.probe([ident]).args == (SID, "99", "", "", "0", "42", "")
    assert scripts.stop(ident, grace=2).args == (SID, "99", "", "", "42", "20", "")
    with pytest.raises(ValueError):
        scripts.stop(ServerIdentity(SID, 1, "", "", job_id="42; rm -rf ~"))


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
        ["sh", "-c", scripts.source("lib.sh") + "\njob_state 42"],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        timeout=10,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (rc, out)


def test_route_is_one_of_two_words() -> None:
    assert scripts.route(SID, "sock").args == (SID, "sock")
    with pytest.raises(ValueError):
        scripts.route(SID, "sock; rm -rf ~")


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


# Every state squeue may print (Slurm 22.05's `JOB STATE CODES`).
ALL_STATES = (
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "COMPLETING", "CONFIGURING", "DEADLINE", "FAILED",
    "NODE_FAIL", "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RESIZING", "REQUEUED",
    "REQUEUE_FED", "REQUEUE_HOLD", "REVOKED", "RUNNING", "SIGNALING", "SPECIAL_EXIT",
    "STAGE_OUT", "STOPPED", "SUSPENDED", "TIMEOUT",
)  # fmt: skip


def test_python_and_the_shell_know_the_same_job_states() -> None:
    """slurm.ACTIVE_STATES is lib.sh's job_active, slurm.QUEUED_STATES its job_queued."""
    import subprocess

    from jlremote import scripts, slurm

    script = scripts.source("lib.sh") + (
        '\nfor s in "$@"; do a=0; q=0; job_active "$s" && a=1; job_queued "$s" && q=1; '
        'echo "$s $a $q"; done\n'
    )
    out = subprocess.run(
        ["sh", "-c", script, "sh", *ALL_STATES], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    said = {w[0]: (w[1] == "1", w[2] == "1") for w in (line.split() for line in out) if w}
    assert said == {s: (s in slurm.ACTIVE_STATES, s in slurm.QUEUED_STATES) for s in ALL_STATES}
