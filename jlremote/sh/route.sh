# route.sh SESSION ROUTE: tell the session's job how the client reaches its node (`sock`
# or `tcp`); the job waits for this.
use_session "$1"
case $2 in sock | tcp) ;; *) say "not a route: $2"; exit 2 ;; esac
printf '%s\n' "$2" >"$d/route"
