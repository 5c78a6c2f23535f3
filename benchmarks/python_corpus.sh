#!/usr/bin/env bash
# A text corpus larger than Shakespeare's plays on a machine without the internet (the GPU machine): every .py file
# of this Python's standard library and site-packages, one document per file, GPT-2 BPE, 1% of the files held out
# for validation. On the GPU image (torch, transformers, lightning) that gave 200.6M training tokens (session 23),
# enough for training-quality comparisons of thousands of 124M steps at a global batch of 32 that never repeat a batch.
#   bash benchmarks/python_corpus.sh OUT_DIR [more `pope-lm prepare text` options, e.g. --workers 16]
set -euo pipefail
out=${1:?usage: bash benchmarks/python_corpus.sh OUT_DIR [prepare options]}
shift
read -r stdlib purelib < <(python3 -c 'import sysconfig; p = sysconfig.get_paths(); print(p["stdlib"], p["purelib"])')
python3 -m pope_lm.cli prepare text --input "$stdlib/**/*.py" "$purelib/**/*.py" --out "$out" "$@"
