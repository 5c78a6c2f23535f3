#!/usr/bin/env bash
# A recipe trained on the GPU exactly as a user starts it (`pope-lm train`: Lightning, the recipe's strategy, data
# workers, MLflow), for a few hundred steps: the speed and memory of the real path, to set beside
# train_throughput.py's loop over random tokens. nvidia-smi samples the card's per-process memory meanwhile; at the end
# the run's logged tokens/s, MFU and PyTorch's peak allocated and reserved memory are printed from its MLflow store.
#   bash benchmarks/recipe_run.sh NAME RECIPE [overrides...]     (DATASET: a prepared corpus, default /tmp/pycode,
#                                                                  made by benchmarks/python_corpus.sh if missing)
#   bash benchmarks/recipe_run.sh default recipes/124m.yaml trainer.max_steps=200
#   bash benchmarks/recipe_run.sh graphs recipes/124m.yaml trainer.max_steps=200 trainer.compile_mode=reduce-overhead
#   NPROC=2 bash benchmarks/recipe_run.sh ddp-2 recipes/774m.yaml trainer.strategy=ddp    (launch/local.sh: 2 GPUs)
# Logs go to $OUT/NAME.log and $OUT/NAME-memory.csv.
set -uo pipefail
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh
name=${1:?usage: bash benchmarks/recipe_run.sh NAME RECIPE [overrides...]}
recipe=${2:?usage: bash benchmarks/recipe_run.sh NAME RECIPE [overrides...]}
shift 2
DATASET=${DATASET:-/tmp/pycode}
[ -f "$DATASET/manifest.json" ] || bash benchmarks/python_corpus.sh "$DATASET" --workers "$(nproc)" >"$OUT/corpus.log" 2>&1
run_dir=/tmp/recipe-run/$name
rm -rf "$run_dir"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader -lms 1000 >"$OUT/$name-memory.csv" &
sampler=$!
if [ "${NPROC:-1}" = 1 ]; then launch=(python3 -m pope_lm.cli train); else launch=(launch/local.sh); fi
NPROC_PER_NODE=${NPROC:-1} "${launch[@]}" "$recipe" data.dataset="$DATASET" trainer.val_every_n_steps=100000 \
    checkpoint.every_n_steps=100000 trainer.test_at_end=false run_dir="$run_dir" "$@" >"$OUT/$name.log" 2>&1
status=$?
kill "$sampler"
echo "$name: exit $status"
grep -a '^done:' "$OUT/$name.log" || tail -5 "$OUT/$name.log"
echo "$name: the card's most memory used by one process $(sort -t, -k2 -n "$OUT/$name-memory.csv" | tail -1)"
for metric in tokens_per_s mfu gpu/peak_allocated_gib gpu/peak_reserved_gib; do
    python3 benchmarks/compare_runs.py "$run_dir" --metric "$metric"
done
