# job.sh DIR: the batch script; it runs on the compute node, with the session directory
# as its argument. It holds no secret (admins and `scontrol` can read job scripts), and
# no value of the user's: the token, the server's argv, --env and --dir are in 0600 files
# that submit.sh left in DIR.
d=$1
rt=$d
cd "$HOME" || exit 1
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
command -v "$1" >/dev/null 2>&1 || job_fail "$RC_NOT_FOUND" "'$1' not found on the compute node"
# The client says how it reaches this node (route.sh): `sock` when its ssh gets here
# through the login host (a private socket), `tcp` otherwise. 2 minutes at most.
i=0
while [ ! -s "$d/route" ] && [ "$i" -lt 6000 ]; do sleep 0.02; i=$((i + 1)); done
route=$(cat "$d/route" 2>/dev/null)
[ -n "$route" ] || job_fail "$RC_SERVER_TIMEOUT" 'no client asked for the server (was start interrupted?)'
# The login host reads the server's runtime file on the shared home: copy it there from a
# node-local runtime directory ($$ is the server once exec'd).
if [ "$rt" != "$d" ]; then
  (
    while kill -0 $$ 2>/dev/null; do
      if f=$(runtime_json "$rt"); then cp "$f" "$d"/ && exit 0; fi
      sleep 0.1
    done
  ) &
fi
# exec: the server is the job's own process, so scancel signals it directly.
if [ "$route" = sock ]; then exec "$@" --sock="$rt/$SOCKET_NAME"; fi
exec "$@" --ip="$addr" --port=0
