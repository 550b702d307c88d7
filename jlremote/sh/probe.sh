# probe.sh [SESSION PID START ARGS PORT JOB LOGIN]...: report `PROBE SESSION STATE` for
# each server, STATE one of running, queued (its job waits to run), gone, foreign (the
# PID is alive but another process now), or elsewhere (LOGIN, the server's login node,
# is not this one: ask it there). A gone server that ended by itself (idle, the job's
# time limit) also gets `ENDED SESSION REASON`.
# PORT (not 0) is a TCP server's port: it must still be the server's own, since once the
# server has died another user may listen there and answer anything. A server in a Slurm
# job (JOB not empty) runs while the job is RUNNING with our comment; its squeue line goes
# out as `JOB SESSION STATE|REASON|NODE|LEFT|START|COMMENT`. When Slurm cannot tell, nothing is
# said of that session (status shows it unknown).
here=$(node_id)
while [ $# -ge 7 ]; do
  sid=$1 pid=$2 st=$3 ar=$4 port=$5 job=$6 login=$7
  shift 7
  if [ -n "$login" ] && [ "$login" != "$here" ]; then
    s=elsewhere
  elif [ -n "$job" ]; then
    js=$(job_state "$job") || continue
    report JOB "$sid $js"
    case $js in
      *"|jlremote:$sid")
        s=gone
        [ "${js%%|*}" = RUNNING ] && s=running
        job_queued "${js%%|*}" && s=queued
        ;;
      "") s=gone ;;
      *) s=foreign ;;
    esac
  else
    is_ours "$pid" "$st" "$ar"
    r=$?
    if [ "$r" = 0 ] && [ "$port" != 0 ] && ! owns_port "$pid" "$port"; then r=1; fi
    case $r in 0) s=running ;; 1) s=gone ;; *) s=foreign ;; esac
  fi
  report PROBE "$sid $s"
  if [ "$s" = gone ] && [ -f "$ENDED/$sid" ]; then report ENDED "$sid $(cat "$ENDED/$sid")"; fi
done
