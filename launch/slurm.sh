#!/usr/bin/env bash
# Train a pope-lm recipe on a Slurm cluster: one task per GPU, started by srun on every node of the job.
#
#   launch/slurm.sh RECIPE [key=value ...]                       submits itself with sbatch (settings below)
#   sbatch [sbatch flags] launch/slurm.sh RECIPE [key=value ...]  the same job, with the sbatch flags you give
#
# Submission settings, from the environment (sbatch's own SBATCH_* variables and flags work as well):
#   NODES (1)  GPUS_PER_NODE (8; 0 on a CPU-only cluster)  TASKS_PER_NODE (= GPUS_PER_NODE; required if 0)
#   CPUS_PER_TASK  TIME (e.g. 24:00:00)  PARTITION  ACCOUNT  SIGNAL_SECONDS (300)  LOG_DIR (logs/slurm)
#   SBATCH_EXTRA (more sbatch flags, split on spaces)  PYTHON (python3: the interpreter with pope-lm installed)
#   DRY_RUN=1 prints the command and runs nothing.
#
# In the job: ranks, node count and the rendezvous (MASTER_ADDR = first node of the allocation) come from
# Slurm. SIGUSR1 (sent by --signal=USR1@SIGNAL_SECONDS before the time limit, or by `scancel --signal=USR1
# [--batch] JOB`) makes training save a checkpoint after its current step and exit with code 75; this script
# then requeues the job, which resumes from that checkpoint with resume=auto. See docs/scaling.md.
#
#SBATCH --job-name=pope-lm
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@300
set -euo pipefail

EXIT_REQUEUE=75  # pope_lm.cli.EXIT_REQUEUE: stopped on SIGUSR1 after saving a checkpoint
PYTHON=${PYTHON:-python3}

die() {
    echo "error: $*" >&2
    exit 2
}

need_count() {  # NAME VALUE [MIN]: VALUE must be an integer >= MIN (default 1)
    if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < ${3:-1})); then
        die "$1 must be an integer >= ${3:-1}; got '$2'"
    fi
}

show() {  # print a command the way a shell would read it back
    printf '+'
    printf ' %q' "$@"
    printf '\n'
}

submit() {
    local nodes=${NODES:-1} gpus=${GPUS_PER_NODE:-8}
    need_count NODES "$nodes"
    need_count GPUS_PER_NODE "$gpus" 0
    local tasks=${TASKS_PER_NODE:-$gpus}
    ((tasks > 0)) || die "TASKS_PER_NODE must be set when GPUS_PER_NODE=0 (processes per node on a CPU cluster)"
    need_count TASKS_PER_NODE "$tasks"
    local signal_seconds=${SIGNAL_SECONDS:-300} log_dir=${LOG_DIR:-logs/slurm}
    need_count SIGNAL_SECONDS "$signal_seconds"
    local name
    name=pope-lm-$(basename "$RECIPE" .yaml)
    local cmd=(sbatch "--job-name=$name" "--nodes=$nodes" "--ntasks-per-node=$tasks"
        "--output=$log_dir/%x-%j.out" "--signal=USR1@$signal_seconds")
    ((gpus == 0)) || cmd+=("--gpus-per-node=$gpus")
    [[ -z ${CPUS_PER_TASK:-} ]] || cmd+=("--cpus-per-task=$CPUS_PER_TASK")
    [[ -z ${TIME:-} ]] || cmd+=("--time=$TIME")
    [[ -z ${PARTITION:-} ]] || cmd+=("--partition=$PARTITION")
    [[ -z ${ACCOUNT:-} ]] || cmd+=("--account=$ACCOUNT")
    local extra
    read -r -a extra <<<"${SBATCH_EXTRA:-}"
    cmd+=("${extra[@]}" "$0" "$RECIPE" "${OVERRIDES[@]}")
    show "${cmd[@]}"
    [[ -n ${DRY_RUN:-} ]] && return
    mkdir -p "$log_dir"  # sbatch does not create the directory of --output
    "${cmd[@]}"
}

run_in_job() {
    local nodes=${SLURM_JOB_NUM_NODES:-1} tasks=${SLURM_NTASKS_PER_NODE:-1}
    # Lightning reads the tasks per node from --ntasks-per-node and refuses a job that only gives --ntasks.
    [[ -n ${SLURM_NTASKS_PER_NODE:-} ]] || ((${SLURM_NTASKS:-1} == 1)) ||
        die "submit with --ntasks-per-node (one task per GPU), not only --ntasks"
    local gpus=${SLURM_GPUS_ON_NODE:-0} accelerator=cpu
    if ((gpus > 0)); then
        ((tasks == gpus)) || die "one task per GPU: $gpus GPUs per node but $tasks tasks; use --ntasks-per-node=$gpus"
        accelerator=gpu
    fi
    # The rendezvous of every rank: the first node of the allocation, a port derived from the job id (so two
    # jobs sharing a node do not collide) unless MASTER_PORT is set.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    # Launcher-derived settings first so that the user's overrides win; a requeued run always resumes.
    local args=(trainer.devices="$tasks" trainer.num_nodes="$nodes" trainer.accelerator="$accelerator"
        resume=auto "${OVERRIDES[@]}")
    ((${SLURM_RESTART_COUNT:-0} == 0)) || args+=(resume=auto)
    # Once a task has exited, srun ends the others after --wait seconds: a crashed rank does not leave the rest
    # hanging in a collective, while ranks that stop together (at the end, or to be requeued) have time to finish
    # exiting (rank 0 closes the MLflow run). --kill-on-bad-exit would kill them at once on exit code 75 too.
    local cmd=(srun --wait=120)
    # srun does not inherit sbatch's --cpus-per-task on every Slurm version.
    [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || cmd+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    cmd+=("$PYTHON" -m pope_lm.cli train "$RECIPE" "${args[@]}")
    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes node(s) x $tasks task(s), rendezvous" \
        "$MASTER_ADDR:$MASTER_PORT"
    show "${cmd[@]}"
    [[ -n ${DRY_RUN:-} ]] && return

    # `--signal=USR1@N` reaches the tasks directly; `--signal=B:USR1@N` and `scancel --batch` reach only this
    # shell, which passes the signal on (srun forwards it to every task). Trap first: an untrapped USR1 kills bash.
    local srun_pid="" status
    trap 'echo "SIGUSR1: asking training to checkpoint and stop"; [[ -z $srun_pid ]] || kill -USR1 "$srun_pid"' USR1
    "${cmd[@]}" &
    srun_pid=$!
    while true; do
        status=0
        wait "$srun_pid" || status=$?
        # A trapped signal interrupts `wait` while srun still runs: wait again.
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    if ((status == EXIT_REQUEUE)); then
        echo "requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$status"
}

(($# >= 1)) || die "usage: launch/slurm.sh RECIPE [key=value ...]"
RECIPE=$1
OVERRIDES=("${@:2}")
[[ -f $RECIPE ]] || die "recipe not found: $RECIPE"
for override in "${OVERRIDES[@]}"; do
    [[ $override == *=* ]] || die "override '$override' is not of the form key=value"
done
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    run_in_job
else
    submit
fi
