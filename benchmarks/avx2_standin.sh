#!/usr/bin/env bash
# Run a command on a stand-in for a slower AVX2-only CPU: torch's and oneDNN's kernels capped to AVX2
# (as `make test-avx2` does, so `dtype auto` picks fp32 and nothing is prepacked) and the CPU time of all
# its processes capped by a cgroup CFS quota, so that the machine runs at the speed of the CPU it
# stands for. Needs root and a writable cgroup cpu controller (v1 or v2); says so in one line if not.
#
#   benchmarks/avx2_standin.sh CPUS COMMAND...      e.g. benchmarks/avx2_standin.sh 0.79 make demo
#
# CPUS is the quota in CPUs for the whole command (0.79: 79 ms of CPU time per 100 ms period, shared by
# its threads). Calibrate it against a measurement made on the real CPU, with the same command:
#   benchmarks/avx2_standin.sh CPUS .venv/bin/python benchmarks/bench_eval.py --dtype fp32 --langs all \
#       --items 10 --skip-naive
# and pick the CPUS whose polyalign seconds match that CPU's (docs/benchmarks.md: 121.3 s on the AVX2-only
# AMD EPYC of 2026-12-02). The quota scales compute and memory time alike, and a single-threaded phase
# runs at up to CPUS of one core; a real slower CPU differs in both, so a stand-in's time is an estimate,
# stated as such in docs/benchmarks.md, never a measurement on that CPU.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CPUS COMMAND..." >&2
  exit 2
fi
cpus=$1
shift
quota=$(python3 -c "import sys; q = float(sys.argv[1]); assert q > 0; print(int(q * 100000))" "$cpus" 2>/dev/null) || {
  echo "avx2_standin: CPUS must be a positive number, got '$cpus'" >&2
  exit 2
}
group="polyalign-standin-$$"
if [ -w /sys/fs/cgroup/cpu ] && [ -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then        # cgroup v1
  dir=/sys/fs/cgroup/cpu/$group
  mkdir "$dir"
  echo 100000 > "$dir/cpu.cfs_period_us"
  echo "$quota" > "$dir/cpu.cfs_quota_us"
elif [ -w /sys/fs/cgroup ] && [ -e /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
  dir=/sys/fs/cgroup/$group                                                                # cgroup v2
  grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control || echo +cpu > /sys/fs/cgroup/cgroup.subtree_control
  mkdir "$dir"
  echo "$quota 100000" > "$dir/cpu.max"
else
  echo "avx2_standin: no writable cgroup cpu controller here (root and cgroup v1 or v2 needed)" >&2
  exit 2
fi
trap 'rmdir "$dir" 2>/dev/null || true' EXIT
# The command runs in a child shell that joins the group first; its processes inherit it.
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 bash -c 'echo $$ > "$0/cgroup.procs" 2>/dev/null || echo $$ > "$0/tasks"; exec "$@"' "$dir" "$@"
