#!/usr/bin/env bash
# One device-tool call of the scale-out validation (issue 5) on 2 GPUs: install what the GPU image lacks, then
# run benchmarks/scaleout.py for groups of runs. Results come back as $OUT/GROUP/*.json (+ the log); merge the groups
# here with `python benchmarks/scaleout.py report ...`. docs/scaling.md gives the wheels to put in .whl.
#
#   run(kind="nvidia-h100-x2", carry=[".whl", ".gpu"], command="bash benchmarks/scaleout_session.sh GROUP...")
#
# GROUP, in the order given, within one 10-minute call (each launch costs ~30-60 s of start-up and save):
#   124m   124M for 50 steps: DDP, ZeRO-2, ZeRO-3, ZeRO-1 on 2 GPUs, a ZeRO-3 run resumed from its checkpoint
#          halfway, then DDP and ZeRO-2 on 1 GPU (scaling efficiency)
#   774m   774M for 20 steps: ZeRO-3, ZeRO-2 and DDP on 2 GPUs at the recipe's micro-batch (peak memory per GPU)
#   774m-ckpt  the same with activation checkpointing, where model state rather than activations fills memory
#   Ngpu-124m  issue 9 on an N-GPU kind (N = 4 or 8): 124M DDP on N GPUs and on 1 at micro-batch 64/N (scaling
#              efficiency, curve vs 1 GPU at the same global batch), 110 steps (100 timed after 10 of warm-up)
#   Ngpu-774m  issue 9: 774M ZeRO-2 on N GPUs and on 1, then ZeRO-3 on N, 110 steps
# The runs stop at a deadline (DEADLINE_S, default 540 s after the start) so that what finished comes back as
# one archive, $OUT/scaleout.tar.gz (the device tool returns at most 8 files).
set -uo pipefail
# shellcheck source=benchmarks/device_setup.sh
source benchmarks/device_setup.sh
DEADLINE_S=${DEADLINE_S:-540}
RESULTS=/tmp/scaleout
mkdir -p "$RESULTS"
nvidia-smi topo -m >"$RESULTS/topology.txt" 2>&1  # NVLink or PCIe between the GPUs: it sets the collectives' speed

# The prepared Shakespeare dataset (.gpu/shakespeare): the machine has no network. One validation batch at
# the start keeps the runs short; the measured steps exclude it.
[ $# -gt 0 ] || set -- usage
for group in "$@"; do
    extra=()
    case $group in
        124m) runs=(--recipe recipes/124m.yaml --steps 50
                    --runs ddp:2 zero2:2 zero3:2 zero1:2 zero3:2:resume ddp:1 zero2:1) ;;
        774m) runs=(--recipe recipes/774m.yaml --steps 20 --warmup 5 --runs zero3:2 zero2:2 ddp:2) ;;
        774m-ckpt) runs=(--recipe recipes/774m.yaml --steps 20 --warmup 5 --runs zero3:2 ddp:2)
                   extra=(model.activation_checkpointing=true) ;;
        [48]gpu-124m) n=${group%%gpu-*}  # 64 sequences = N GPUs x 64/N, or 64/N-sequence micro-batches on one
                      runs=(--recipe recipes/124m.yaml --steps 110 --warmup 10 --runs "ddp:$n" ddp:1)
                      extra=("trainer.micro_batch_size=$((64 / n))") ;;
        [48]gpu-774m) n=${group%%gpu-*}
                      runs=(--recipe recipes/774m.yaml --steps 110 --warmup 10 --runs "zero2:$n" zero2:1 "zero3:$n") ;;
        *)
            echo "usage: benchmarks/scaleout_session.sh GROUP... (124m, 774m, 774m-ckpt, 4gpu-124m, 4gpu-774m," \
                "8gpu-124m, 8gpu-774m)" >&2
            exit 2
            ;;
    esac
    left=$((DEADLINE_S - SECONDS))
    [ "$left" -gt 30 ] || break
    mkdir -p "$RESULTS/$group"
    timeout "$left" python3 benchmarks/scaleout.py run "${runs[@]}" --out "$RESULTS/$group" \
        --runs-dir "/tmp/runs/$group" -- data.dataset=.gpu/shakespeare data.val_batches=1 "${extra[@]}" 2>&1 |
        tee "$RESULTS/$group.log" | grep -v -i "warn" | grep -E "^\+|Error|error" | cut -c1-300
    python3 benchmarks/scaleout.py report "$RESULTS/$group"/*.json  # skips the partial file of a run cut short
done
tar -czf "$OUT/scaleout.tar.gz" -C "$RESULTS" .
