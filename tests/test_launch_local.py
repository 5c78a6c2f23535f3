"""launch/local.sh: the torchrun command it builds, its one-line errors, and two simulated nodes training together."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from launch_helpers import FAST, REPO, TINY, checkpoint_steps, launcher_env, mlflow_run_ids, run_launcher


def test_one_node_command_uses_all_processes_of_the_node() -> None:
    result = run_launcher("local.sh", str(TINY), "trainer.max_steps=5",
                          env=launcher_env(DRY_RUN="1", NPROC_PER_NODE="4"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("+ ")
    assert "-m torch.distributed.run --nproc_per_node=4 --standalone -m pope_lm.cli train" in result.stdout
    assert result.stdout.rstrip().endswith(
        "trainer.devices=4 trainer.num_nodes=1 trainer.accelerator=cpu trainer.max_steps=5")


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        ((), {}, "usage: launch/local.sh RECIPE"),
        (("nope.yaml",), {}, "recipe not found: nope.yaml"),
        ((str(TINY), "resume"), {}, "override 'resume' is not of the form key=value"),
        ((str(TINY),), {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a positive integer; got '0'"),
        ((str(TINY),), {"NNODES": "2"}, "NNODES=2 needs RDZV_ENDPOINT=host:port"),
    ],
)
def test_user_errors_are_one_line(args: tuple[str, ...], settings: dict[str, str], message: str) -> None:
    result = run_launcher("local.sh", *args, env=launcher_env(DRY_RUN="1", **settings))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.slow
def test_two_nodes_of_one_process_train_the_tiny_recipe_together(tmp_path: Path) -> None:
    """Two torchrun agents, as on two machines (--nnodes 2, one process each), meet at a c10d rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = launcher_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="two-nodes")
    args = [str(REPO / "launch" / "local.sh"), str(TINY), *FAST, "name=two-nodes", "trainer.max_steps=6",
            "checkpoint.every_n_steps=3", "trainer.val_every_n_steps=3"]
    nodes = [subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-3000:]
        assert "trainer.devices=1 trainer.num_nodes=2" in log.splitlines()[0]  # the printed command
    ranks = sorted(next(line for line in log.splitlines() if "GLOBAL_RANK:" in line) for log in logs)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in ranks[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in ranks[1]
    assert all("done: step 6" in log for log in logs)
    run_dir = tmp_path / "runs" / "two-nodes"
    assert checkpoint_steps(run_dir) == [3, 6]
    assert len(mlflow_run_ids(run_dir)) == 1  # both nodes opened the store at once; one run, rank 0's
