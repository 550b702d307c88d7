# stop.sh SESSION PID START ARGS JOB TICKS LOGIN: on the login node LOGIN ("": any; else
# ELSEWHERE and nothing done), stop exactly our server, then remove its
# session directory. TERM once it is proven ours (PID, start time and command line; for a
# job: job id and our comment, through scancel), KILL only if it is still there after
# TICKS tenths of a second. Reports `STOP STATE`: stopped, killed, gone or foreign.
use_session "$1"
pid=$2 st=$3 ar=$4 job=$5 ticks=$6
at_node "$7"
state=gone
if [ -n "$job" ]; then
  # Slurm must answer first: a job it cannot tell about is neither ours nor ended, and
  # its directory (token, log) stays until it can.
  s=$(job_state "$job") || { say "Slurm did not answer about job $job (is slurmctld up?)"; exit "$RC_SLURM_SILENT"; }
  # While waiting, a Slurm that does not answer counts as the job still running.
  live() { s=$(job_state "$job") || return 0; job_active "${s%%|*}"; }
  case $s in
    *"|jlremote:$1")
      if live; then
        scancel "$job"
        state=stopped
        i=0
        while live && [ "$i" -lt "$ticks" ]; do sleep 0.1; i=$((i + 1)); done
        if live; then scancel -s KILL "$job"; state=killed; fi
      fi
      ;;
    *) live && state=foreign ;;
  esac
  rm -rf "$d"
else
  is_ours "$pid" "$st" "$ar"
  r=$?
  if [ "$r" = 2 ]; then state=foreign; fi
  if [ "$r" = 0 ]; then
    kill -TERM "$pid"
    state=stopped
    i=0
    while is_ours "$pid" "$st" "$ar" && [ "$i" -lt "$ticks" ]; do sleep 0.1; i=$((i + 1)); done
    if is_ours "$pid" "$st" "$ar"; then kill -KILL "$pid"; state=killed; fi
  fi
  drop_entry "$d"
fi
rm -f "$ENDED/$1"
report STOP "$state"
