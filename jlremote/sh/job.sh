# job.sh DIR: the batch script; it runs on the compute node, with the session directory
# as its argument. It holds no secret (admins and `scontrol` can read job scripts), and
# no value of the user's: the token, the server's argv, --env and --dir are in 0600 files
# that submit.sh left in DIR.
d=$1
rt=$d
cd "$HOME" || exit 1
# Slurm's warning before the time limit (submit adds --signal=B:USR1@...) reaches this
# shell, not the server: it records why the session ends and stops the server cleanly
# (TERM: Jupyter shuts its kernels down and exits), so the job ends before it is killed.
sid=${d##*/}
srv=
on_warning() {
  mark_ended "$sid" 'the job reached its time limit'
  if [ -n "$srv" ]; then kill -TERM "$srv" 2>/dev/null; else exit 0; fi
}
trap on_warning USR1
# scancel (`stop`) signals the whole job: this shell stays until the server has shut down,
# so that the server is still the job's when Slurm ends what is left.
on_term() { if [ -n "$srv" ]; then kill -TERM "$srv" 2>/dev/null; else exit 143; fi; }
trap on_term TERM
# job_fail CODE MESSAGE: the job's own error (into its log), and its code for poll.sh.
job_fail() { say "$2"; printf '%s\n' "$1" >"$d/failed"; exit "$1"; }
[ -s "$d/token" ] || job_fail "$RC_NO_TOKEN" 'no token in the session directory'
# Kernel sockets must fit a Unix socket address: a deep home gets a short private
# directory on the node.
if [ ${#d} -gt "$MAX_RUNTIME_DIR" ]; then rt=$(mktemp -d /tmp/jlremote-XXXXXXXX) || exit 1; fi
# The token from its 0600 file, not the environment kernels inherit.
unset JUPYTER_TOKEN
export JUPYTER_TOKEN_FILE="$d/token" JUPYTER_RUNTIME_DIR="$rt"
# First the node (the client tries to reach it while --env and the rest run): its address
# as the rest of the cluster (the login host too) uses it.
node=${SLURMD_NODENAME:-$(hostname -s)}
addr=$(scontrol show node "$node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
[ -n "$addr" ] || addr=$(hostname)
printf '%s %s\n' "$node" "$addr" >"$d/node"
set --
while IFS= read -r a; do set -- "$@" "$a"; done <"$d/job.argv"
dir=$(cat "$d/job.dir")
{ eval "$(cat "$d/job.env")"; } </dev/null || job_fail "$RC_ENV_FAILED" 'the --env snippet failed in the job'
cd "$(remote_path "$dir")" || job_fail "$RC_NO_DIR" "remote directory not found: $dir"
# The default `jupyter` not on the PATH: the private JupyterLab, if there is one (its
# kernel the --env Python, as launch.sh does it).
if [ "$1" = jupyter ] && private_lab "$d" "$(cat "$d/job.env")"; then
  shift
  set -- "$lab_jupyter" "$@" $lab_args
  printf '%s\n' "$kernel" >"$d/private" # (which kernel: env or own)
fi
command -v "$1" >/dev/null 2>&1 || job_fail "$RC_NOT_FOUND" "'$1' not found on the compute node"
# The client says how it reaches this node (route.sh): `sock` when its ssh gets here
# through the login host (a private socket), `tcp` otherwise. It has job.route_wait
# seconds for that (0: as long as the job lasts, for a job queued with --no-wait, whose
# client may be asleep when it starts; with --idle-timeout, that long at most).
limit=$(cat "$d/job.route_wait" 2>/dev/null) || limit=120
idle_s='' idle_label=''
if [ -s "$d/idle" ]; then read -r idle_s idle_label <"$d/idle"; fi
if [ "$limit" = 0 ] && [ -n "$idle_s" ]; then limit=$idle_s; fi
start=$(date +%s)
while [ ! -s "$d/route" ]; do
  if [ "$limit" != 0 ] && [ $(($(date +%s) - start)) -ge "$limit" ]; then break; fi
  # Quick while a client is likely to be waiting, then calmer.
  if [ $(($(date +%s) - start)) -lt 120 ]; then sleep 0.02; else sleep 0.5; fi
done
route=$(cat "$d/route" 2>/dev/null)
if [ -z "$route" ] && [ -n "$idle_s" ]; then
  mark_ended "$sid" "idle for $idle_label (no client came)"
  say "no client came within $idle_label: the job ends"
  exit 0
fi
[ -n "$route" ] || job_fail "$RC_SERVER_TIMEOUT" 'no client asked for the server (was start interrupted?)'
# The login host reads the server's runtime file on the shared home: copy it there from a
# node-local runtime directory.
if [ "$rt" != "$d" ]; then
  (
    while kill -0 $$ 2>/dev/null; do
      if f=$(runtime_json "$rt"); then cp "$f" "$d"/ && exit 0; fi
      sleep 0.1
    done
  ) &
fi
if [ "$route" = sock ]; then
  set -- "$@" "--sock=$rt/$SOCKET_NAME"
else
  set -- "$@" "--ip=$addr" --port=0
fi
# The server is this shell's child (scancel signals the whole job; the warning above
# reaches only this shell); the job ends with the server's exit code.
"$@" </dev/null &
srv=$!
start_watcher "$d" "$rt" || say 'no python3 on the node: --idle-timeout cannot work here'
while :; do
  wait "$srv"
  rc=$?
  kill -0 "$srv" 2>/dev/null || break
done
exit "$rc"
