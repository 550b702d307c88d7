# submit.sh SESSION NAME KIND SCRIPT ENV DIR ARGV ROUTE_WAIT IDLE WATCHER SBATCH...: make
# the session directory, store the token (stdin), leave the job script SCRIPT and what it
# runs (the server's ARGV, one word per line, the --env snippet, the --dir, how long it
# waits for a client (ROUTE_WAIT seconds, 0: as long as the job lasts), the idle watcher
# WATCHER and its IDLE `SECONDS LABEL` if any) in 0600 files there, and submit it with
# the user's SBATCH options, each its own word. Reports `JOB ID` and `DIR`; on a refusal,
# sbatch's own words follow our line on stderr.
sid=$1 name=$2 kind=$3 script=$4 env=$5 dir=$6 argv=$7 route_wait=$8 idle=$9
shift 9
watcher=$1
shift
use_session "$sid"
new_session_dir
store_token
printf '%s\n' "$name" >"$d/name"
printf '%s\n' "$kind" >"$d/kind"
printf '%s' "$script" >"$d/job.sh"
printf '%s\n' "$argv" >"$d/job.argv"
printf '%s' "$env" >"$d/job.env"
printf '%s' "$dir" >"$d/job.dir"
printf '%s\n' "$route_wait" >"$d/job.route_wait"
if [ -n "$idle" ]; then
  printf '%s\n' "$idle" >"$d/idle"
  printf '%s' "$watcher" >"$d/idle.py"
fi
command -v sbatch >/dev/null 2>&1 || {
  say 'sbatch not found on the remote (is it a Slurm login node?)'
  drop_entry "$d"
  exit "$RC_NO_SBATCH"
}
out=$(sbatch "--job-name=jlremote-$name" "$@" --parsable "--comment=jlremote:$sid" \
  --output="$d/server.log" "$d/job.sh" "$d" 2>"$d/sbatch.err") || {
  say 'sbatch refused the job'
  cat "$d/sbatch.err" >&2
  drop_entry "$d"
  exit "$RC_SBATCH_FAILED"
}
job=${out%%;*}
printf '%s\n' "$job" >"$d/job.id"
report JOB "$job"
report DIR "$d"
