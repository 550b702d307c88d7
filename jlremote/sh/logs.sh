# logs.sh SESSION LINES FOLLOW LOGIN: on the login node LOGIN ("": any), the last LINES lines of the session's server log; with
# FOLLOW=1 also new lines, until the session directory goes (the session was stopped) or
# the client does: the local side holds ssh's stdin open, so its end is our EOF (and no
# stray `tail` stays).
use_session "$1"
at_node "$4"
if [ ! -f "$d/server.log" ] && [ -f "$d/job.id" ]; then
  say 'no log yet: the job has not started'
  exit "$RC_NO_ENTRY"
fi
[ -f "$d/server.log" ] || { say 'the server log is gone (the session has ended)'; exit "$RC_NO_ENTRY"; }
[ "$3" = 1 ] || exec tail -n "$2" "$d/server.log"
tail -n "$2" -F "$d/server.log" 2>/dev/null &
t=$!
# A background job's stdin is /dev/null unless redirected: give it ours (fd 3).
exec 3<&0
(
  cat <&3 >/dev/null
  kill "$t" 2>/dev/null
) &
w=$!
exec 3<&-
while kill -0 "$t" 2>/dev/null && [ -d "$d" ]; do sleep 1; done
kill "$t" "$w" 2>/dev/null
exit 0
