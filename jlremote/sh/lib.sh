# shellcheck shell=sh
# The library of jlremote's remote scripts: scripts.py puts it in front of each of them.
# No value of the user's is ever part of this text or of a script's: they all arrive as
# positional arguments. Every script runs under bash where the remote has it, else sh.
# What a script reports goes to stdout as `JLREMOTE-KEY value` lines (protocol.py reads
# them); its own error goes to stderr as one `jlremote: ...` line, with an exit code below.

umask 077

# shellcheck disable=SC2034  # the scripts that follow the library use these
{
  # The scripts' own exit codes: remote.py maps each to jlremote's exit code, in one table.
  RC_SESSION_DIR=80     # cannot create the session directory
  RC_NO_TOKEN=81        # no token on stdin
  RC_ENV_FAILED=82      # the --env snippet failed
  RC_NO_DIR=83          # --dir does not exist
  RC_SERVER_EXITED=84   # the server exited during start-up
  RC_SERVER_TIMEOUT=85  # the server did not start in time
  RC_NO_ENTRY=86        # no such session (or its log) on the remote
  RC_NO_SBATCH=87       # no sbatch on the login host
  RC_SBATCH_FAILED=88   # sbatch refused the job
  RC_NO_SUBCOMMAND=89   # `jupyter lab` (or notebook) is not installed
  RC_NEEDS_ROOT=90      # Jupyter refused to run as root without --allow-root
  RC_NO_SOCKET=91       # the server could not serve on a Unix socket
  RC_SLURM_SILENT=92    # Slurm did not answer about a job
  RC_ELSEWHERE=93       # this is another login node than the session's
  RC_NO_PYTHON=94       # no (usable) python3 on the remote
  RC_INSTALL_FAILED=95  # the private JupyterLab could not be installed
  RC_IN_USE=96          # the private JupyterLab runs a server: not removed
  RC_NOT_FOUND=127      # jupyter not found (the shell's own code for it)

  SESSIONS=$HOME/.jlremote/sessions
  # Why a session's server ended by itself (idle, the job's time limit): ENDED/SESSION,
  # kept past its session directory until the client has been told (stop removes it).
  ENDED=$HOME/.jlremote/ended
  # The private JupyterLab (`jlremote install`): LAB/NAME/venv, complete once LAB/NAME/ok is.
  LAB=$HOME/.jlremote/lab
  LOG_TAIL=15
  # A kernel's sockets are RUNTIME/kernel-<uuid>-ipc-<n>: 51 bytes after the directory, and
  # a Unix socket address holds 107. A longer session directory (a deep home) gets a short
  # private runtime directory in /tmp instead, named in the session's `run` file.
  MAX_RUNTIME_DIR=56
  SOCKET_NAME=jupyter.sock
}


# say MESSAGE: our one error line (stderr).
say() { printf 'jlremote: %s\n' "$1" >&2; }

# report KEY VALUE: one line of the protocol (stdout).
report() { printf 'JLREMOTE-%s %s\n' "$1" "$2"; }

# report_file FILE: a server's runtime JSON, between JLREMOTE-INFO and JLREMOTE-END.
report_file() { echo JLREMOTE-INFO; cat "$1"; echo; echo JLREMOTE-END; }

# node_id: this login node, as `NAME BOOT_ID`. Several login nodes behind one name share
# one home: each session directory says (its `login` file) which node its server runs on.
node_id() {
  printf '%s %s\n' "$(uname -n)" "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo -)"
}

# node_addr: the address this ssh connection really reached (the remote's SSH_CONNECTION).
node_addr() { printf '%s\n' "$SSH_CONNECTION" | cut -d' ' -f3; }

# at_node NODE: go on only on the login node NODE ("": any); elsewhere, say where this is.
at_node() {
  [ -z "$1" ] && return 0
  here=$(node_id)
  [ "$here" = "$1" ] && return 0
  say "this is the login node $here, not $1"
  exit "$RC_ELSEWHERE"
}

# mark_ended SESSION REASON: why SESSION's server ended by itself.
mark_ended() { mkdir -p "$ENDED" && printf '%s\n' "$2" >"$ENDED/$1"; }

# start_watcher DIR RUNTIME: when the session asked for --idle-timeout (DIR/idle holds
# `SECONDS LABEL`), the watcher (DIR/idle.py) beside its server, detached; it ends the
# server after that long without activity and exits with it (or its directory).
start_watcher() {
  [ -s "$1/idle" ] || return 0
  py=$(command -v python3 || command -v python) || return 1
  if command -v setsid >/dev/null 2>&1; then
    setsid nohup "$py" "$1/idle.py" "$1" "$2" "$ENDED" </dev/null >>"$1/idle.log" 2>&1 &
  else
    nohup "$py" "$1/idle.py" "$1" "$2" "$ENDED" </dev/null >>"$1/idle.log" 2>&1 &
  fi
  printf '%s\n' "$!" >"$1/watcher.pid"
}

# stop_watcher DIR: end DIR's watcher now (its argv names DIR/idle.py: that proves it).
stop_watcher() {
  [ -f "$1/watcher.pid" ] || return 0
  w=$(cat "$1/watcher.pid")
  case "$(ps -ww -o args= -p "$w" 2>/dev/null)" in *" $1/idle.py "*) kill "$w" 2>/dev/null ;; esac
}

# private_jupyter: the jupyter of a complete private JupyterLab that runs here (the home
# may be shared by machines of other kinds: its Python must start).
private_jupyter() {
  for ok in "$LAB"/*/ok; do
    [ -f "$ok" ] || continue
    t=${ok%/ok}
    if "$t/venv/bin/python" -c '' 2>/dev/null && [ -x "$t/venv/bin/jupyter" ]; then
      printf '%s\n' "$t/venv/bin/jupyter"
      return 0
    fi
  done
  return 1
}

# private_lab DIR ENV: where the default `jupyter` is not on the PATH, the private
# JupyterLab (succeeds, lab_jupyter its jupyter). Its kernel is the user's --env Python
# when ENV is given and that Python has ipykernel: kernel=env, a kernelspec under
# DIR/jupyter (JUPYTER_PATH exported) that the server must make its default
# (lab_args); else kernel=own. For launch.sh and job.sh alike (the other scripts do not
# use what it sets).
# shellcheck disable=SC2034
private_lab() {
  kernel='' lab_args=''
  command -v jupyter >/dev/null 2>&1 && return 1
  lab_jupyter=$(private_jupyter) || return 1
  kernel=own
  [ -n "$2" ] || return 0
  py=$(command -v python3) && "$py" -c 'import ipykernel' 2>/dev/null || return 0
  mkdir -p "$1/jupyter/kernels/env"
  "$py" -c 'import json, sys
spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (--env)", "language": "python"}
with open(sys.argv[1], "w") as f:
    json.dump(spec, f)' "$1/jupyter/kernels/env/kernel.json"
  export JUPYTER_PATH="$1/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
  kernel=env lab_args=--MultiKernelManager.default_kernel_name=env
}

# check_id ID: session (and probe) ids are lowercase hex only: they name files.
check_id() { case $1 in '' | *[!0-9a-f]*) say "not a session id: $1"; exit 2 ;; esac; }

# use_session ID: d is the session's private directory.
use_session() { check_id "$1"; d=$SESSIONS/$1; }

# new_session_dir: create $d (0700, in a 0700 tree).
new_session_dir() {
  mkdir -p "$SESSIONS" && chmod 700 "$HOME/.jlremote" "$SESSIONS" && mkdir "$d" ||
    { say 'cannot create the session directory'; exit "$RC_SESSION_DIR"; }
}

# store_token: the token from stdin into $d/token (0600; printf is a builtin, so it is in
# no argv). The server reads it from there, not from the environment kernels inherit.
store_token() {
  IFS= read -r t || { say 'no token on stdin'; drop_entry "$d"; exit "$RC_NO_TOKEN"; }
  printf '%s' "$t" >"$d/token"
  t=
}

# remote_path PATH: the user's remote path; `~`, `~/x` and relative paths are in $HOME.
# shellcheck disable=SC2088  # the user's literal `~/`, made $HOME here
remote_path() {
  case $1 in
    '' | '~') printf '%s\n' "$HOME" ;;
    '~/'*) printf '%s/%s\n' "$HOME" "${1#??}" ;;
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$HOME" "$1" ;;
  esac
}

# rundir DIR: where a session's runtime files are (its `run` file names a short one).
rundir() { if [ -f "$1/run" ]; then cat "$1/run"; else printf '%s\n' "$1"; fi; }

# drop_entry DIR: remove a session directory and its runtime directory.
drop_entry() {
  stop_watcher "$1"
  r=$(rundir "$1")
  [ "$r" = "$1" ] || rm -rf "$r"
  rm -rf "$1"
}

# runtime_json DIR...: the first complete jpserver-*.json (or nbserver-*.json) in DIRs.
# The server writes it in pieces: a closing brace in column 0 means it is complete.
runtime_json() {
  for r in "$@"; do
    for c in "$r"/jpserver-*.json "$r"/nbserver-*.json; do
      if [ -f "$c" ] && grep -q '^}' "$c"; then
        printf '%s\n' "$c"
        return 0
      fi
    done
  done
  return 1
}

# is_ours PID START ARGS: 0 if PID is alive and still the very process we started, 1 if
# it is gone, 2 if the PID is another process now.
is_ours() {
  kill -0 "$1" 2>/dev/null || return 1
  case "$(ps -o stat= -p "$1")" in Z*) return 1 ;; esac
  [ "$(TZ=UTC LC_ALL=C ps -o lstart= -p "$1")" = "$2" ] || return 2
  [ "$(ps -ww -o args= -p "$1")" = "$3" ] || return 2
}

# owns_port PID PORT: does PID hold the listening TCP socket on PORT? (Linux: its fds
# against /proc/net/tcp*; elsewhere lsof.) What a process of another user listening on a
# dead server's port cannot fake.
owns_port() {
  if [ -r /proc/net/tcp ]; then
    h=$(printf ':%04X' "$2")
    for i in $(awk -v h="$h" '$4 == "0A" && substr($2, length($2) - 4) == h { print $10 }' \
      /proc/net/tcp /proc/net/tcp6 2>/dev/null); do
      # shellcheck disable=SC2010  # the fd links are what we look for, not file names
      ls -l "/proc/$1/fd" 2>/dev/null | grep -q "socket:\[$i\]" && return 0
    done
    return 1
  fi
  lsof -nP -a -p "$1" -iTCP:"$2" -sTCP:LISTEN >/dev/null 2>&1
}

# job_state JOB: `STATE|REASON|NODES|TIMELEFT|START|COMMENT`, or nothing once Slurm has forgotten
# the job ("Invalid job id"); fails when Slurm cannot tell (the controller is down or
# slow), which a caller must never take for "ended".
job_state() {
  o=$(squeue -h -t all -j "$1" -o '%T|%r|%N|%L|%S|%k' 2>&1) &&
    { printf '%s\n' "$o" | grep '|' | head -n 1; return 0; }
  case $o in *"Invalid job id"*) return 0 ;; esac
  return 1
}

# job_queued STATE: is a job in STATE waiting to run? (slurm.QUEUED_STATES: a unit test
# holds the two equal.)
job_queued() {
  case $1 in
    PENDING | CONFIGURING | REQUEUED | REQUEUE_HOLD | REQUEUE_FED) return 0 ;;
  esac
  return 1
}

# job_active STATE: may a job in STATE still run (or soon)? Anything else has ended.
# (slurm.ACTIVE_STATES: a unit test holds the two equal.)
job_active() {
  case $1 in
    PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | REQUEUED | REQUEUE_HOLD | \
      REQUEUE_FED | RESIZING | SIGNALING | STAGE_OUT) return 0 ;;
  esac
  return 1
}

# The registry is the session directories: each holds name, kind, server.pid, server.start,
# server.args and the server's runtime JSON (0600, token included).

# report_entry DIR: one JLREMOTE-ENTRY block for the live server of DIR.
report_entry() {
  f=$(runtime_json "$(rundir "$1")" "$1") || return 1
  report ENTRY "${1##*/}"
  report NAME "$(cat "$1/name" 2>/dev/null)"
  report KIND "$(cat "$1/kind" 2>/dev/null)"
  report PID "$(cat "$1/server.pid")"
  report START "$(cat "$1/server.start")"
  report ARGS "$(cat "$1/server.args")"
  report DIR "$1"
  [ -f "$1/login" ] && report LOGIN "$(cat "$1/login")"
  report_file "$f"
}

# report_other DIR: an entry of another login node: only that node can tell whether its
# server lives, so it is reported as it is, with the node (LOGIN NAME BOOT ADDR).
report_other() {
  report ENTRY "${1##*/}"
  report NAME "$(cat "$1/name" 2>/dev/null)"
  report KIND "$(cat "$1/kind" 2>/dev/null)"
  report LOGIN "$(cat "$1/login")"
}

# elsewhere DIR: is DIR's server on another login node than this one?
elsewhere() {
  [ -f "$1/login" ] || return 1
  read -r ln lb _ <"$1/login"
  [ "$ln $lb" != "$here" ]
}

# scan [NAME]: report every live server of this user here (or only the one named NAME,
# then succeed), and remove the directories of dead ones. Entries of other login nodes
# are reported as they are (report_other) and never removed here.
scan() {
  here=$(node_id)
  for e in "$SESSIONS"/*; do
    if [ -f "$e/job.id" ]; then
      # A server in a Slurm job: not on this host, so not attachable here. Its directory
      # goes once Slurm says the job has ended (never when squeue cannot tell).
      command -v squeue >/dev/null 2>&1 || continue
      js=$(job_state "$(cat "$e/job.id")") || continue
      job_active "${js%%|*}" || drop_entry "$e"
      continue
    fi
    [ -f "$e/server.pid" ] || continue
    if elsewhere "$e"; then
      if [ -z "$1" ]; then
        report_other "$e"
      elif [ "$(cat "$e/name" 2>/dev/null)" = "$1" ]; then
        report_other "$e" && return 0
      fi
      continue
    fi
    if is_ours "$(cat "$e/server.pid")" "$(cat "$e/server.start" 2>/dev/null)" \
      "$(cat "$e/server.args" 2>/dev/null)"; then
      if [ -z "$1" ]; then
        report_entry "$e"
      elif [ "$(cat "$e/name" 2>/dev/null)" = "$1" ]; then
        report_entry "$e" && return 0
      fi
    else
      drop_entry "$e"
    fi
  done
  [ -z "$1" ]
}
