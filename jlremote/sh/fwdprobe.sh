# fwdprobe.sh PROBE ENV GREETER: start GREETER (a Python program, with the remote's
# python3 after --env) in a private directory: it greets one client on a Unix socket and
# one on 127.0.0.1, so that doctor can test both kinds of forwarding for real. Reports
# `FWD PORT SOCKET`, or `FWD -` when there is no python3.
check_id "$1"
d=$HOME/.jlremote/doctor-$1
{ eval "$2"; } </dev/null >/dev/null 2>&1
py=$(command -v python3 || command -v python) || { report FWD -; exit 0; }
mkdir -p "$HOME/.jlremote" && chmod 700 "$HOME/.jlremote" && mkdir "$d" || exit 1
# The socket as start would make it: in a short 0700 directory when the home is too deep.
r=$d
if [ ${#d} -gt 90 ]; then r=$(mktemp -d /tmp/jlremote-XXXXXXXX) || exit 1; fi
printf '%s\n' "$r" >"$d/run"
# In its private directory: `-c` puts the working directory on the import path.
cd "$d" || exit 1
setsid nohup "$py" -c "$3" "$d" "$r/s" </dev/null >/dev/null 2>&1 &
printf '%s\n' "$!" >"$d/pid"
i=0
while [ ! -s "$d/port" ] && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
report FWD "$(cat "$d/port" 2>/dev/null || echo -) $r/s"
