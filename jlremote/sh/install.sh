# install.sh NAME PYTHON: JLREMOTE-INSTALL-COPY. A private JupyterLab for this user in
# LAB/NAME, from the wheels that arrive on stdin (a gzipped tar, made by the client for
# this remote's platform): no network, nothing outside the home. A venv of PYTHON without
# pip, the wheels installed by the pip wheel among them, then the `ok` file: whatever
# fails before that (an interrupted copy, a full disk) removes LAB/NAME, and without
# `ok` nothing would use it anyway.
name=$1 py=$2
case $name in '' | *[!A-Za-z0-9._-]*) say "not an install name: $name"; exit 2 ;; esac
t=$LAB/$name
if [ -f "$t/ok" ]; then
  cat >/dev/null
  report INSTALLED "$t"
  exit 0
fi
# undo MESSAGE: nothing of this attempt stays.
undo() { say "$1"; rm -rf "$t"; exit "$RC_INSTALL_FAILED"; }
mkdir -p "$LAB" && chmod 700 "$HOME/.jlremote" "$LAB" || undo "cannot create $LAB"
rm -rf "$t"
mkdir -p "$t/wheels" || undo "cannot create $t"
tar xzf - -C "$t/wheels" 2>"$t/copy.log" ||
  undo 'the copy of the wheels did not arrive whole (interrupted, or the disk is full)'
"$py" -m venv --without-pip "$t/venv" >"$t/venv.log" 2>&1 || undo "$py -m venv failed: $(tail -n 1 "$t/venv.log")"
set -- "$t"/wheels/pip-*.whl
[ -f "$1" ] || undo 'no pip wheel among the wheels'
"$t/venv/bin/python" "$1/pip" install --quiet --no-index --no-cache-dir --find-links "$t/wheels" \
  --no-warn-script-location jupyterlab >"$t/install.log" 2>&1 ||
  undo "installing the wheels failed: $(tail -n 1 "$t/install.log")"
"$t/venv/bin/jupyter" lab --version >/dev/null 2>&1 || undo 'the installed JupyterLab does not start'
rm -rf "$t/wheels"
date +%s >"$t/ok"
report INSTALLED "$t"
