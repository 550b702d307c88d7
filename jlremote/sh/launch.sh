# launch.sh SESSION NAME KIND ATTACH WAIT TIMEOUT TRANSPORT ENV DIR IDLE WATCHER JUPYTER ARG...
# Start a detached Jupyter server (JUPYTER ARG...) in a new private session directory and
# report on it, or report the live server already named NAME (ATTACH=1: only that).
# WAIT is whole seconds to wait, TIMEOUT what the user asked for. IDLE (`SECONDS LABEL`,
# or empty) asks for the idle watcher, whose Python text is WATCHER. The token comes on
# stdin. Reports: WAIT lines while waiting (a write to a vanished
# client raises SIGPIPE, and the trap stops the half-started server), then PID, START,
# ARGS, DIR, LOGIN (this login node and the address the client reached) and the server's
# runtime JSON. A live server of NAME on another login node is reported with its LOGIN
# and no runtime JSON: the client attaches to it there.
sid=$1 name=$2 kind=$3 attach=$4 wait_s=$5 timeout=$6 transport=$7 env=$8 dir=$9
shift 9
idle=$1 watcher=$2
shift 2

# A live server of this name (started by any client of this user) is reused.
if [ -n "$name" ] && scan "$name"; then exit 0; fi
if [ "$attach" = 1 ]; then
  say "no running session named $name on the remote"
  exit "$RC_NO_ENTRY"
fi

use_session "$sid"
rt=$d
child=
# Whatever goes wrong after launch, the half-started server and its files go too.
end_child() {
  [ -n "$child" ] || return 0
  kill "$child" 2>/dev/null
  j=0
  while kill -0 "$child" 2>/dev/null && [ "$j" -lt 50 ]; do sleep 0.1; j=$((j + 1)); done
  kill -9 "$child" 2>/dev/null
}
abort() { trap - PIPE HUP INT TERM; end_child; drop_entry "$d"; exit 1; }
# fail CODE MESSAGE: our error, the server log's last lines, and nothing left behind.
fail() {
  say "$2"
  [ -f "$d/server.log" ] && tail -n "$LOG_TAIL" "$d/server.log" >&2
  drop_entry "$d"
  exit "$1"
}
# why CODE: the code for a server that ended (or never answered), from Jupyter's words.
why() {
  if grep -q 'Jupyter command .jupyter-.* not found' "$d/server.log" 2>/dev/null; then
    echo "$RC_NO_SUBCOMMAND"
  elif grep -q -e '--allow-root' "$d/server.log" 2>/dev/null; then
    echo "$RC_NEEDS_ROOT"
  elif [ "$transport" = socket ] && grep -qi 'sock' "$d/server.log" 2>/dev/null; then
    echo "$RC_NO_SOCKET"
  else
    echo "$1"
  fi
}
trap abort PIPE HUP INT TERM

new_session_dir
if [ ${#d} -gt "$MAX_RUNTIME_DIR" ]; then
  rt=$(mktemp -d /tmp/jlremote-XXXXXXXX) && printf '%s\n' "$rt" >"$d/run" ||
    fail "$RC_SESSION_DIR" 'cannot create a private directory in /tmp'
fi
store_token
unset JUPYTER_TOKEN
export JUPYTER_TOKEN_FILE="$d/token" JUPYTER_RUNTIME_DIR="$rt"
printf '%s\n' "$name" >"$d/name"
printf '%s\n' "$kind" >"$d/kind"
# The login node first: another node scanning the shared home must never take this
# entry for one of its own (server.pid comes later).
printf '%s %s\n' "$(node_id)" "$(node_addr)" >"$d/login"
{ eval "$env"; } </dev/null >&2 || fail "$RC_ENV_FAILED" 'the --env snippet failed on the remote'
cd "$(remote_path "$dir")" 2>/dev/null || fail "$RC_NO_DIR" "remote directory not found: $dir"
# The default `jupyter` not on the PATH: the private JupyterLab, if there is one.
kernel=
if [ "$1" = jupyter ] && private_lab "$d" "$env"; then
  shift
  set -- "$lab_jupyter" "$@" $lab_args
fi
command -v "$1" >/dev/null 2>&1 || fail "$RC_NOT_FOUND" "'$1' not found on the remote"
if [ -n "$idle" ]; then
  command -v python3 >/dev/null 2>&1 || command -v python >/dev/null 2>&1 ||
    fail "$RC_NO_PYTHON" 'no python3 on the remote for the --idle-timeout watcher'
  printf '%s\n' "$idle" >"$d/idle"
  printf '%s' "$watcher" >"$d/idle.py"
fi
[ "$transport" = socket ] && set -- "$@" "--sock=$rt/$SOCKET_NAME"

# setsid: its own session, so no hang-up reaches it; stdin from /dev/null, no pty.
if command -v setsid >/dev/null 2>&1; then
  setsid nohup "$@" </dev/null >"$d/server.log" 2>&1 &
else
  nohup "$@" </dev/null >"$d/server.log" 2>&1 &
fi
child=$!
deadline=$(($(date +%s) + wait_s))
until f=$(runtime_json "$rt"); do
  kill -0 "$child" 2>/dev/null ||
    fail "$(why "$RC_SERVER_EXITED")" 'the server exited during start-up'
  if [ "$(date +%s)" -ge "$deadline" ]; then
    end_child
    fail "$(why "$RC_SERVER_TIMEOUT")" "the server did not start within ${timeout}s"
  fi
  echo JLREMOTE-WAIT
  # A short tick: every tick of delay here is delay to the user's URL.
  sleep 0.02
done
pid=${f##*-}
pid=${pid%.json}
st=$(TZ=UTC LC_ALL=C ps -o lstart= -p "$pid")
ar=$(ps -ww -o args= -p "$pid")
printf '%s\n' "$pid" >"$d/server.pid"
printf '%s\n' "$st" >"$d/server.start"
printf '%s\n' "$ar" >"$d/server.args"
start_watcher "$d" "$rt"
report PID "$pid"
report START "$st"
report ARGS "$ar"
report DIR "$d"
report LOGIN "$(cat "$d/login")"
[ -n "$kernel" ] && report PRIVATE "$kernel"
report_file "$f"
