# pyprobe.sh: what the private installer needs to know of this remote: its python3
# (PYTHON, VERSION), machine and C library (MACHINE, LIBC), whether it can make a venv
# (VENV), the free space in the home (FREE, in kB), and the private JupyterLabs already
# complete here (INSTALLED, one each).
py=$(command -v python3) || {
  say 'no python3 on the remote (a private JupyterLab needs Python 3.9 or newer there)'
  exit "$RC_NO_PYTHON"
}
report PYTHON "$py"
"$py" -c 'import platform, sys
print("JLREMOTE-VERSION %d.%d" % sys.version_info[:2])
print("JLREMOTE-MACHINE " + platform.machine())
print("JLREMOTE-LIBC " + " ".join(platform.libc_ver()))
try:
    import venv  # noqa: F401 (whether it is there)
    print("JLREMOTE-VENV 1")
except ImportError:
    print("JLREMOTE-VENV 0")'
report FREE "$(df -Pk "$HOME" | awk 'NR == 2 { print $4 }')"
for ok in "$LAB"/*/ok; do
  [ -f "$ok" ] && report INSTALLED "${ok%/ok}"
done
exit 0
