# poll.sh SESSION JOB ASK: the job's state (`JOBSTATE` line; only with ASK=1, which runs
# squeue), the node as soon as the job runs there (`NODE NAME ADDR`: the client picks its
# route then), the job script's own exit code if it failed (`FAILED CODE`), and the
# server's runtime JSON once it is up. When the job has ended (or failed), its log's last
# lines go to stderr.
use_session "$1"
s=RUNNING
if [ "$3" = 1 ]; then
  # No JOBSTATE line when Slurm cannot tell: as if it was not asked.
  if s=$(job_state "$2"); then report JOBSTATE "$s"; else s=RUNNING; fi
fi
[ -f "$d/node" ] && report NODE "$(cat "$d/node")"
[ -f "$d/failed" ] && report FAILED "$(cat "$d/failed")"
if [ -f "$d/node" ] && f=$(runtime_json "$d"); then report_file "$f"; fi
if [ -f "$d/failed" ] || ! job_active "${s%%|*}"; then
  tail -n "$LOG_TAIL" "$d/server.log" >&2 2>/dev/null
fi
exit 0
