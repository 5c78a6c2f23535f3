#!/usr/bin/env bash
# Train a pope-lm recipe on this machine with torchrun: one process per GPU.
#
#   launch/local.sh RECIPE [key=value ...]
#
# Environment:
#   NPROC_PER_NODE  processes (default: the GPUs nvidia-smi lists; 1 CPU process when there are none)
#   NNODES (1)      for several machines without Slurm: run the same command on each, with RDZV_ENDPOINT=host:port
#                   of one of them (c10d rendezvous; node ranks are assigned on arrival) and the same RDZV_ID
#   PYTHON (python3: the interpreter with pope-lm installed)   DRY_RUN=1 prints the command and runs nothing.
# Ranks and the world size reach training through torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, ...).
set -euo pipefail

PYTHON=${PYTHON:-python3}

die() {
    echo "error: $*" >&2
    exit 2
}

(($# >= 1)) || die "usage: launch/local.sh RECIPE [key=value ...]"
RECIPE=$1
[[ -f $RECIPE ]] || die "recipe not found: $RECIPE"
for override in "${@:2}"; do
    [[ $override == *=* ]] || die "override '$override' is not of the form key=value"
done

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
fi
accelerator=cpu
((gpus == 0)) || accelerator=gpu
nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
nnodes=${NNODES:-1}
for setting in "NPROC_PER_NODE=$nproc" "NNODES=$nnodes"; do
    [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]] || die "${setting%%=*} must be a positive integer; got '${setting#*=}'"
done

cmd=("$PYTHON" -m torch.distributed.run "--nproc_per_node=$nproc")
if ((nnodes == 1)); then
    cmd+=(--standalone)
else
    [[ -n ${RDZV_ENDPOINT:-} ]] || die "NNODES=$nnodes needs RDZV_ENDPOINT=host:port (one of the nodes), the same on all"
    cmd+=("--nnodes=$nnodes" --rdzv_backend=c10d "--rdzv_endpoint=$RDZV_ENDPOINT" "--rdzv_id=${RDZV_ID:-pope-lm}")
fi
# Launcher-derived settings first so that the user's overrides win.
cmd+=(-m pope_lm.cli train "$RECIPE" trainer.devices="$nproc" trainer.num_nodes="$nnodes"
    trainer.accelerator="$accelerator" "${@:2}")

printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
[[ -n ${DRY_RUN:-} ]] || exec "${cmd[@]}"
