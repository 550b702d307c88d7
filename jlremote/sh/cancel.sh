# cancel.sh SESSION JOB: scancel the job if it is still this session's (job id plus our
# comment), report its last state (JOBSTATE) and its log's last lines (stderr), and remove
# the session directory.
use_session "$1"
# The job was submitted moments ago by this very start: when Slurm cannot say whose it is,
# cancelling it anyway is right (leaving it queued is not).
if s=$(job_state "$2"); then
  report JOBSTATE "$s"
  case $s in *"|jlremote:$1") scancel "$2" ;; esac
else
  scancel "$2"
fi
tail -n "$LOG_TAIL" "$d/server.log" >&2 2>/dev/null
rm -rf "$d"
rm -f "$ENDED/$1"
exit 0
