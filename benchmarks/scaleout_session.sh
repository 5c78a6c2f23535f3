#!/usr/bin/env bash
# One device-tool call of the scale-out validation (issue 5) on 2 GPUs: install what the GPU image lacks, then
# run benchmarks/scaleout.py for groups of runs. Results come back as $OUT/GROUP/*.json (+ the log); merge the groups
# here with `python benchmarks/scaleout.py report ...`. docs/scaling.md gives the wheels to put in .whl.
#
#   run(kind="nvidia-h100-x2", carry=[".whl", ".gpu"], command="bash benchmarks/scaleout_session.sh GROUP...")
#
# GROUP (124m-a + 774m fit one 10-minute call, 124m-b another):
#   124m-a   124M: DDP and ZeRO-2 on 1 and 2 GPUs (scaling efficiency)
#   124m-b   124M: ZeRO-1, ZeRO-3 and a ZeRO-3 run resumed from its checkpoint halfway, on 2 GPUs
#   774m     774M: DDP and ZeRO-3 on 2 GPUs at the recipe's micro-batch (peak memory per GPU)
set -euo pipefail
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh

# The prepared Shakespeare dataset (.gpu/shakespeare): the machine has no network. One validation batch at
# the start keeps the runs short; the measured steps exclude it.
common=(--runs-dir /tmp/runs -- data.dataset=.gpu/shakespeare data.val_batches=1)
[ $# -gt 0 ] || set -- usage
for group in "$@"; do
    case $group in
        124m-a) runs=(--recipe recipes/124m.yaml --steps 50 --runs ddp:1 ddp:2 zero2:1 zero2:2) ;;
        124m-b) runs=(--recipe recipes/124m.yaml --steps 50 --runs zero1:2 zero3:2 zero3:2:resume) ;;
        774m) runs=(--recipe recipes/774m.yaml --steps 20 --warmup 5 --runs ddp:2 zero3:2) ;;
        *)
            echo "usage: benchmarks/scaleout_session.sh GROUP... (124m-a, 124m-b, 774m)" >&2
            exit 2
            ;;
    esac
    mkdir -p "$OUT/$group"
    python3 benchmarks/scaleout.py run "${runs[@]}" --out "$OUT/$group" "${common[@]}" 2>&1 |
        tee "$OUT/scaleout-$group.log" | grep -v -i "warn"
    python3 benchmarks/scaleout.py report "$OUT/$group"/*.json
done
