#!/usr/bin/env bash
# Several indirect-indexing attempts at once, one GPU each: one device call on a multi-GPU kind costs the same
# session time as on one GPU, and a run alone on its GPU trains ~1.8x faster than two sharing one.
# Each argument is one variant, `POSITIONS:OVERRIDES`: the INDIRECT_POSITIONS and the INDIRECT_OVERRIDES of one
# copy of experiments/paper_session.sh (every other INDIRECT_* setting, TRAIN_TIME and RESUME apply to all).
# Variant i runs on GPU i with its own run folder, and its archive comes back as $OUT/variant-<i>.tar.gz.
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="INDIRECT_LR=2e-4 INDIRECT_TEST_ON=best \
#       INDIRECT_STEPS=60000 INDIRECT_DECAY=25000 TRAIN_TIME=00:00:07:50 bash experiments/indirect_variants.sh \
#       'pope:model.attention_backend=triton' 'rope:' 'pope:model.attention_backend=reference seed=1'")
# (PoPE's `auto` backend runs the reference at these 64 tokens: name the kernel to train with it.)
# then the same with RESUME=1 and the cumulative TRAIN_TIME while the machine is warm (paper_session.sh).
# SPARE_GPU_COMMAND, if set, runs on the next GPU after the variants' (once the wheels are installed, so it may use
# pope-lm and the benchmarks), its output in $OUT/spare-gpu.log, e.g.
#   SPARE_GPU_COMMAND="python3 benchmarks/attention.py --out \$OUT/attention"
set -uo pipefail
if [ $# -eq 0 ]; then
    echo "usage: bash experiments/indirect_variants.sh POSITIONS:OVERRIDES [POSITIONS:OVERRIDES ...]" >&2
    exit 2
fi
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
wanted=$#  # a GPU per variant, and one for SPARE_GPU_COMMAND
[ -n "${SPARE_GPU_COMMAND:-}" ] && wanted=$((wanted + 1))
if [ "$wanted" -gt "$gpus" ]; then
    echo "error: $# variants${SPARE_GPU_COMMAND:+ and SPARE_GPU_COMMAND} need $wanted GPUs, this machine has $gpus" >&2
    exit 2
fi
for spec in "$@"; do
    if [[ $spec != *:* ]]; then
        echo "error: variant '$spec' is not POSITIONS:OVERRIDES (e.g. 'pope:optim.weight_decay=0.1')" >&2
        exit 2
    fi
done
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh
export OUT DEVICE_READY=1
# The copies would otherwise all generate the same data into the same folder at once.
[ -d /tmp/data/indirect ] || python3 -m pope_lm.cli prepare indirect --out /tmp/data/indirect

pids=()
if [ -n "${SPARE_GPU_COMMAND:-}" ]; then
    echo "== GPU $#: $SPARE_GPU_COMMAND (output: \$OUT/spare-gpu.log)"
    CUDA_VISIBLE_DEVICES=$# bash -c "$SPARE_GPU_COMMAND" >"$OUT/spare-gpu.log" 2>&1 &
    spare=$!
fi
for i in $(seq 0 $(($# - 1))); do
    spec=${*:$((i + 1)):1}
    echo "== variant $i on GPU $i: positions '${spec%%:*}', overrides '${spec#*:}'"
    CUDA_VISIBLE_DEVICES=$i RUNS=/tmp/runs/variant-$i ARCHIVE=variant-$i.tar.gz INDIRECT_POSITIONS="${spec%%:*}" \
        INDIRECT_OVERRIDES="${spec#*:}" bash experiments/paper_session.sh indirect >"/tmp/variant-$i.out" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || status=1
    echo "== variant $i"
    cat "/tmp/variant-$i.out"
done
if [ -n "${spare:-}" ]; then
    wait "$spare" || { echo "SPARE_GPU_COMMAND failed (\$OUT/spare-gpu.log)"; status=1; }
fi
exit $status
