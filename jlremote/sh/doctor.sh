# doctor.sh ENV JUPYTER SLURM: what `doctor` asks the remote, in one go. The shell, the OS,
# free space in the home, the jlremote sessions running here (ENTRY blocks, as list.sh),
# and `jupyter` after the --env snippet with its package versions (V lines). With SLURM=1,
# first (before --env: `start` needs them there) where sbatch, squeue and scancel are
# (SLURM-BIN) and the partitions with their availability (SLURM-PART).
env=$1 jupyter=$2
if [ "$3" = 1 ]; then
  for c in sbatch squeue scancel; do report SLURM-BIN "$c $(command -v "$c" 2>/dev/null)"; done
  sinfo -h -o '%P %a' 2>/dev/null | sed 's/^/JLREMOTE-SLURM-PART /'
fi
report SHELL "${SHELL:-unknown}"
report HOME "$HOME"
report OS "$(uname -sr 2>/dev/null)"
report DF "$(df -Pk "$HOME" 2>/dev/null | awk 'NR==2 {print $4}')"
{ eval "$env"; } </dev/null >/dev/null 2>&1 || echo JLREMOTE-ENV-FAILED
p=$(command -v "$jupyter" 2>/dev/null)
# The default jupyter not on the PATH: the private JupyterLab (`jlremote install`), if any.
if [ -z "$p" ] && [ "$jupyter" = jupyter ] && p=$(private_jupyter); then
  jupyter=$p
  report PRIVATE 1
fi
report JUPYTER "$p"
if [ -n "$p" ]; then
  "$jupyter" --version 2>/dev/null | sed -n 's/^\([a-z_]*\) *: *\(.*\)$/JLREMOTE-V \1 \2/p'
fi
# Last: the ENTRY records (every line after an ENTRY belongs to it).
scan ''
