#!/usr/bin/env bash
# Optimizer steps per second of a small, launch-bound recipe under each torch.compile mode, PoPE and RoPE, one
# run after another on the same GPU (never side by side: they would share it). The question it answers: do CUDA
# graphs (trainer.compile_mode=reduce-overhead) buy the paper runs more steps per device call?
# Each run trains STEPS steps with validation only at step 0 and no test pass; the rate is MLflow's tokens/s
# (SpeedMonitor, averaged over each 100 steps) over the second half of the run, divided by the tokens per step.
#   STEPS=800 bash benchmarks/step_rate.sh            (recipes/indirect.yaml with paper_session.sh's batch)
#   MODES=reduce-overhead POSITIONS=pope-triton bash benchmarks/step_rate.sh
# POSITIONS lists model.position values, PoPE's with the attention backend after a dash (`auto` picks the reference
# at these 64 tokens, pope_lm/position.py, so the kernel must be asked for by name).
set -uo pipefail
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh
STEPS=${STEPS:-800}
MODES=${MODES:-default reduce-overhead}
POSITIONS=${POSITIONS:-pope-triton pope-reference rope}
DATA=/tmp/data/indirect
[ -d "$DATA" ] || python3 -m pope_lm.cli prepare indirect --out "$DATA" >/dev/null
for mode in $MODES; do
    for position in $POSITIONS; do
        run=/tmp/step-rate/$position-$mode
        backend=auto
        [[ $position == *-* ]] && backend=${position#*-}
        rm -rf "$run" && mkdir -p "$(dirname "$run")"
        start=$(date +%s)
        python3 -m pope_lm.cli train recipes/indirect.yaml data.dataset="$DATA" model.position="${position%%-*}" \
            trainer.global_batch_size=256 trainer.micro_batch_size=256 trainer.max_steps="$STEPS" \
            trainer.val_every_n_steps=100000 trainer.log_every_n_steps=100 trainer.test_at_end=false \
            checkpoint.every_n_steps=100000 trainer.compile_mode="$mode" model.attention_backend="$backend" \
            run_dir="$run" >"$run.log" 2>&1 \
            || { echo "$position $mode failed (whole log: $OUT/$(basename "$run").log):"; tail -5 "$run.log"
                 cp "$run.log" "$OUT/"; continue; }
        STEPS=$STEPS RUN=$run MODE=$mode POSITION=$position WALL=$(($(date +%s) - start)) python3 - <<'PY'
import os
import statistics

from mlflow import MlflowClient

client = MlflowClient(f"sqlite:///{os.environ['RUN']}/mlflow.db")
run = client.search_runs([client.get_experiment_by_name("pope-lm").experiment_id])[0]
history = client.get_metric_history(run.info.run_id, "tokens_per_s")
late = [m.value for m in history if m.step > int(os.environ.get("STEPS", 800)) // 2]
rate = statistics.median(late) / (256 * 64)
print(f"{os.environ['POSITION']:14s} compile_mode={os.environ['MODE']:16s} {rate:6.1f} steps/s "
      f"(median of {len(late)} windows; whole run {os.environ['WALL']} s with start-up and compile); "
      f"peak {run.data.metrics.get('gpu/peak_allocated_gib', float('nan')):.2f} GiB, "
      f"final train/loss {run.data.metrics.get('train/loss', float('nan')):.3f}")
PY
    done
done
