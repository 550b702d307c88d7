# fwdclean.sh PROBE: stop fwdprobe.sh's greeter if it still waits (a forward that did not
# work never reached it): only the process whose command line names its directory.
check_id "$1"
d=$HOME/.jlremote/doctor-$1
p=$(cat "$d/pid" 2>/dev/null)
if [ -n "$p" ]; then
  case "$(ps -ww -o args= -p "$p")" in *"$d"*) kill "$p" ;; esac
fi
drop_entry "$d"
