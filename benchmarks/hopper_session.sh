#!/usr/bin/env bash
# One device-tool call for a change to the Hopper kernels (kernels/flash_hopper.py), as session 14 ran it in three:
#   1. hopper_check.py: this checkout's kernels against float64 beside the Triton kernels, then each pass alone and
#      fwd+bwd timed against the given revisions, in one process;
#   2. compute-sanitizer synccheck over one small forward+backward (barrier misuse: a named barrier's count, a
#      bar.sync that not every thread of a warp reaches), with more blocks than SMs, so that the persistent forward
#      and dq pass loop over items; then over one with LONG_KEYS keys or more, the forward's long configuration;
#   3. ncu's sampled stalls per instruction at the pretraining shape, summed by ncu_source_summary.py.
# Logs come back in $OUT. Each revision is another flash_hopper.py (e.g. `git show HEAD:kernels/flash_hopper.py >
# ab/head.py`) in an ignored folder that the call carries; one whose passes take other arguments needs a small adapter
# module that exposes this checkout's signatures (session 14: old_adapter.py).
#
#   run(kind="nvidia-h100-x1", carry=["ab"], command="bash benchmarks/hopper_session.sh ab/head.py")
#
# About 8-9 minutes with one revision, estimated from session 14's calls (hopper_check ~5, synccheck ~1 a shape, ncu
# ~1); on a fresh machine (cold compile cache) hopper_check with two revisions took 8 (session 15), so its 7-minute
# cap may cut the last timed shapes: pass fewer revisions there. NO_NCU=1 skips step 3.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

revisions=()
[ $# -gt 0 ] && revisions=(--revision "$@")
# a kernel that deadlocks hangs the call: the timeout leaves the later steps their minutes, and the log, written line
# by line, shows the last case that finished
timeout 420 python3 benchmarks/hopper_check.py --no-triton-timings "${revisions[@]}" 2>&1 |
    grep --line-buffered -v -i "warn\|run_backward" | tee "$OUT/hopper_check.log"

echo "== synccheck"
for shape in "8 4 1100 64" "2 4 2100 64"; do  # (the second: 128-key tiles in the forward, flash_hopper.LONG_CONFIGS)
    # shellcheck disable=SC2086
    timeout 120 compute-sanitizer --tool synccheck python3 benchmarks/attention_profile.py --shape $shape 2>&1 |
        grep -v "^==PROF==" | tail -4
done | tee "$OUT/synccheck.log"

if [ "${NO_NCU:-0}" != 1 ]; then
    echo "== ncu"
    ncu --clock-control none --nvtx --nvtx-include "profiled/" \
        --kernel-name regex:"_fwd_kernel|_dq_kernel|_dkdv_kernel" --section SourceCounters -o /tmp/src \
        python3 benchmarks/attention_profile.py --shape 16 12 1024 64 2>&1 | grep -v "^==PROF==" | tail -2
    ncu -i /tmp/src.ncu-rep --page source --csv --print-source sass >/tmp/src.csv &&
        python3 benchmarks/ncu_source_summary.py /tmp/src.csv | tee "$OUT/ncu-source.txt"
fi
