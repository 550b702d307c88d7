# uninstall.sh: remove every private JupyterLab of this user here (LAB), unless one runs a
# server (then nothing is removed). Reports REMOVED with what was there.
[ -d "$LAB" ] || { report REMOVED ''; exit 0; }
# (awk finds the path in the environment: no argv of this check holds it)
if ps -u "$(id -u)" -o args= 2>/dev/null | LABP="$LAB/" awk 'index($0, ENVIRON["LABP"]) { f = 1 } END { exit !f }'; then
  say 'a server runs from the private JupyterLab: stop its sessions first'
  exit "$RC_IN_USE"
fi
rm -rf "$LAB"
report REMOVED "$LAB"
