#!/usr/bin/env bash
# One device-tool call that A/Bs the training step across code revisions: each DIR is a checkout (`.` for this one;
# others exported into an ignored folder that the call carries), and each runs train_throughput.py, with the
# arguments after `--`, in its own process with its own inductor cache: a process that reuses another revision's
# cache fails, because the cached graphs assert the custom ops' output strides of the revision that compiled them.
# Compare the PoPE/RoPE ratio within each process: a later process has run every kernel 1-4% slower than the first
# (session 17, on an H200), the matmuls included, so absolute times across processes carry that bias.
#   mkdir -p ab/base && git archive HEAD | tar -x -C ab/base --exclude=benchmarks/results \
#       --exclude=experiments --exclude=docs
#   run(kind="nvidia-h100-x1", carry=[".whl", "ab"], command="bash benchmarks/train_step_ab.sh ab/base . -- \
#       --recipes 124m --variants pope-triton rope --compile-mode reduce-overhead")
# Logs and JSON come back in $OUT as train_step_<i>.*, numbered in the order of the DIRs.
set -euo pipefail
dirs=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    dirs+=("$(realpath "$1")")
    shift
done
[ $# -gt 0 ] && shift
here=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for i in "${!dirs[@]}"; do
    dir=${dirs[$i]}
    echo "== $i: $dir"
    [ "$dir" = "$here" ] || ln -sfn "$here/.whl" "$dir/.whl"
    # device_setup.sh installs the checkout in editable mode, so `pope_lm` resolves to it
    (cd "$dir" && source benchmarks/device_setup.sh &&
        TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$i python3 benchmarks/train_throughput.py \
            --out "$OUT/train_step_$i.json" "$@" 2>&1 | grep --line-buffered -v -i "warn" |
            tee "$OUT/train_step_$i.log")
done
