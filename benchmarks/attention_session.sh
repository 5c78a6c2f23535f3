#!/usr/bin/env bash
# One device-tool call on one H100: install the carried pope-pytorch wheels (peer c; nothing else is needed,
# attention.py imports the kernels from this checkout), then run benchmarks/attention.py: checks against
# float64 and timings for every shape, ours vs the peers, and the A/B case of the backward. Extra arguments
# go to attention.py (e.g. --shapes 2 --no-ab).
#   run(kind="nvidia-h100-x1", carry=[".whl"], timeout_s=420, command="bash benchmarks/attention_session.sh")
set -euo pipefail
wheels=(.whl/pope_pytorch-*.whl .whl/einx-*.whl .whl/frozendict-*.whl .whl/torch_einops_utils-*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" \
    || echo "pope-pytorch wheels missing: peer c is left out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 benchmarks/attention.py --out "$OUT" "$@" 2>&1 | grep -v -i "warn"
