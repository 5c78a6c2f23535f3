"""launch/slurm.sh: the commands it builds, its one-line errors, and real jobs on a one-node Slurm cluster.

The cluster (munged, slurmctld, slurmd from Debian's slurm-wlm and munge) is started by the tests and stopped by
PID (tests/slurm_cluster.py). Without root or those packages the cluster tests skip, unless
POPE_LM_REQUIRE_SLURM=1 (set by .ci/run) turns that into a failure.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from launch_helpers import FAST, REPO, TINY, checkpoint_steps, launcher_env, mlflow_run_ids, run_launcher
from slurm_cluster import FINAL_STATES, SlurmCluster, missing_requirements

JOB_TIMEOUT = 240  # seconds; a job here takes about 20 s, most of it Python start-up on 2 cores


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    reason = missing_requirements()
    if reason is not None:
        if os.environ.get("POPE_LM_REQUIRE_SLURM") == "1":
            pytest.fail(f"the Slurm tests cannot run: {reason}")
        pytest.skip(reason)
    with SlurmCluster(cpus=2) as started:
        yield started


def test_submission_prints_and_builds_the_sbatch_command() -> None:
    env = launcher_env(DRY_RUN="1", NODES="4", GPUS_PER_NODE="8", TIME="12:00:00", PARTITION="gpu", ACCOUNT="lab",
                       SIGNAL_SECONDS="600", SBATCH_EXTRA="--qos=high --exclusive")
    result = run_launcher("slurm.sh", "recipes/774m.yaml", "trainer.max_steps=10", env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("+ sbatch ")
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=12:00:00", "--partition=gpu",
                 "--account=lab", "--signal=USR1@600", "--output=logs/slurm/%x-%j.out", "--job-name=pope-lm-774m",
                 "--qos=high --exclusive", "recipes/774m.yaml trainer.max_steps=10"):
        assert flag in result.stdout


def test_cpu_cluster_submission_asks_for_tasks_instead_of_gpus() -> None:
    env = launcher_env(DRY_RUN="1", GPUS_PER_NODE="0", TASKS_PER_NODE="16")
    result = run_launcher("slurm.sh", str(TINY), env=env)
    assert "--ntasks-per-node=16" in result.stdout and "--gpus" not in result.stdout


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        ((), {}, "usage: launch/slurm.sh RECIPE"),
        (("nope.yaml",), {}, "recipe not found: nope.yaml"),
        ((str(TINY), "trainer.max_steps"), {}, "override 'trainer.max_steps' is not of the form key=value"),
        ((str(TINY),), {"GPUS_PER_NODE": "0"}, "TASKS_PER_NODE must be set when GPUS_PER_NODE=0"),
        ((str(TINY),), {"NODES": "two"}, "NODES must be an integer >= 1; got 'two'"),
    ],
)
def test_user_errors_are_one_line(args: tuple[str, ...], settings: dict[str, str], message: str) -> None:
    result = run_launcher("slurm.sh", *args, env=launcher_env(DRY_RUN="1", **settings))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr


def _job_env(cluster: SlurmCluster, **slurm: str) -> dict[str, str]:
    """What srun-less code sees inside a batch job, faked for a dry run (scontrol only reads slurm.conf here)."""
    return launcher_env(cluster.env, DRY_RUN="1", SLURM_JOB_ID="1234", **slurm)


def test_in_the_job_it_derives_ranks_and_rendezvous_from_slurm(cluster: SlurmCluster) -> None:
    env = _job_env(cluster, SLURM_JOB_NODELIST="gpu[3-4]", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16",
                   SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8", SLURM_RESTART_COUNT="1")
    result = run_launcher("slurm.sh", str(TINY), "resume=runs/x/step-00000100.ckpt", env=env)
    assert result.returncode == 0, result.stderr
    assert "2 node(s) x 8 task(s), rendezvous gpu3:21234" in result.stdout
    srun = next(line for line in result.stdout.splitlines() if line.startswith("+ srun"))
    # A requeued job (restart 1) resumes from the newest checkpoint even when the first run started from a path.
    assert srun.endswith("trainer.devices=8 trainer.num_nodes=2 trainer.accelerator=gpu resume=auto "
                         "resume=runs/x/step-00000100.ckpt resume=auto")


@pytest.mark.parametrize(
    ("slurm", "message"),
    [
        ({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"},
         "one task per GPU: 8 GPUs per node but 2 tasks; use --ntasks-per-node=8"),
        ({"SLURM_NTASKS": "2"}, "submit with --ntasks-per-node (one task per GPU), not only --ntasks"),
    ],
)
def test_in_the_job_it_refuses_a_task_layout_training_cannot_use(cluster: SlurmCluster, slurm: dict[str, str],
                                                                 message: str) -> None:
    result = run_launcher("slurm.sh", str(TINY), env=_job_env(cluster, SLURM_JOB_NODELIST="gpu3",
                                                              SLURM_JOB_NUM_NODES="1", **slurm))
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")


def _submitted(output: str) -> str:
    match = re.search(r"Submitted batch job (\d+)", output)
    assert match, output
    return match.group(1)


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_sbatch_runs_two_ddp_tasks_to_completion(cluster: SlurmCluster, tmp_path: Path) -> None:
    env = launcher_env(cluster.env, GPUS_PER_NODE="0", TASKS_PER_NODE="2", LOG_DIR="logs")
    result = run_launcher("slurm.sh", str(TINY), *FAST, "name=done", "trainer.max_steps=6",
                          "checkpoint.every_n_steps=3", "trainer.val_every_n_steps=3", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--ntasks-per-node=2" in result.stdout
    job = cluster.wait_for_state(_submitted(result.stdout), FINAL_STATES, JOB_TIMEOUT)
    log = Path(job["StdOut"]).read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert job["StdOut"] == str(tmp_path / "logs" / f"pope-lm-tiny-{job['JobId']}.out")  # the log of this job
    assert "1 node(s) x 2 task(s)" in log and "+ srun" in log
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # DDP over two tasks
    assert "done: step 6" in log
    assert checkpoint_steps(tmp_path / "runs" / "done") == [3, 6]


STAND_IN_RANK = """#!/usr/bin/env bash
# Stands in for `python -m pope_lm.cli train ...` as one rank: waits for SIGUSR1, then exits with the requeue code
# as a preempted rank does; once requeued, it reports its arguments and succeeds.
if ((${SLURM_RESTART_COUNT:-0} > 0)); then echo "rank $SLURM_PROCID restarted with: $*"; exit 0; fi
trap 'echo "rank $SLURM_PROCID got SIGUSR1"; exit 75' USR1
echo "rank $SLURM_PROCID ready"
while true; do sleep 0.1; done
"""


def test_batch_shell_passes_usr1_to_the_tasks_and_requeues_on_exit_75(cluster: SlurmCluster, tmp_path: Path) -> None:
    """`--signal=B:USR1@N` and `scancel --batch` signal only the batch shell: its trap must reach every task."""
    stand_in, log = tmp_path / "rank.sh", tmp_path / "job.out"
    stand_in.write_text(STAND_IN_RANK)
    stand_in.chmod(0o755)
    result = cluster.run(["sbatch", "--ntasks-per-node=2", f"--output={log}", str(REPO / "launch" / "slurm.sh"),
                          str(TINY), "name=stand-in"], env=launcher_env(cluster.env, PYTHON=str(stand_in)),
                         cwd=tmp_path)
    job_id = _submitted(result.stdout)
    _wait(lambda: log.is_file() and log.read_text().count(" ready") == 2, JOB_TIMEOUT, "both ranks to start")
    cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    job = cluster.wait_for_state(job_id, FINAL_STATES, JOB_TIMEOUT)
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "rank 0 got SIGUSR1" in text and "rank 1 got SIGUSR1" in text and "requeueing job" in text
    assert text.count("restarted with: -m pope_lm.cli train") == 2 and "name=stand-in resume=auto\n" in text


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_the_job_finishes_from_its_checkpoint(cluster: SlurmCluster,
                                                                           tmp_path: Path) -> None:
    """What `--signal=USR1@N` does before the time limit: the tasks get SIGUSR1 (here from scancel, on time).

    Training stops after a logged step, saves it as an ordinary checkpoint and exits 75; the script requeues the
    job, whose next run resumes from exactly that checkpoint (resume=auto), in the same MLflow run, to the end.
    """
    run_dir, log = tmp_path / "runs" / "preempted", tmp_path / "job.out"
    steps = 60  # enough that training cannot reach the end before the signal, even on a loaded machine
    result = cluster.run(
        ["sbatch", "--ntasks-per-node=2", f"--output={log}", str(REPO / "launch" / "slurm.sh"), str(TINY), *FAST,
         "name=preempted", f"trainer.max_steps={steps}", "checkpoint.every_n_steps=2", "trainer.log_every_n_steps=2",
         "trainer.val_every_n_steps=100"],
        env=launcher_env(cluster.env), cwd=tmp_path)
    job_id = _submitted(result.stdout)
    # Signal once training runs (a checkpoint exists): before that, no handler is installed yet.
    _wait(lambda: checkpoint_steps(run_dir), JOB_TIMEOUT, "the first checkpoint")
    cluster.run(["scancel", "--signal=USR1", job_id])
    job = cluster.wait_for_state(job_id, FINAL_STATES, JOB_TIMEOUT)

    text = log.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    stops = {int(step) for step in re.findall(r"stopped on SIGUSR1 after step (\d+)", text)}  # printed by each rank
    assert len(stops) == 1
    stop = stops.pop()
    assert 2 <= stop < steps and stop % 2 == 0  # after a logged step (log_every_n_steps=2)
    assert "requeueing job" in text
    assert f"Restored all states from the checkpoint at runs/preempted/checkpoints/step-{stop:08d}.ckpt" in text
    assert f"done: step {steps}" in text
    assert not list(tmp_path.rglob("hpc_ckpt*"))  # Lightning's own requeue checkpoints stay off
    assert len(mlflow_run_ids(run_dir)) == 1
