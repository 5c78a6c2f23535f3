"""What the launcher tests share: the scripts, a fast variant of the tiny recipe, and reading a run's results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
# recipes/tiny.yaml made smaller still (one narrow layer, 32-token sequences, one validation batch): a training
# step takes a fraction of a second on 2 cores, so process start-up dominates every launcher test.
FAST = ("model.n_layer=1", "model.d_model=32", "model.n_head=1", "model.head_dim=32", "data.seq_len=32",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "data.val_batches=1")


# What a launcher sets for its processes; in the test process they are leftovers (Lightning, run in-process by
# other tests, exports MASTER_PORT), which would override what the scripts derive.
_LAUNCHER_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE",
                       "LOCAL_WORLD_SIZE", "NODE_RANK"}


def _leftover(key: str) -> bool:
    return (key in _LAUNCHER_VARIABLES or key.startswith("TORCHELASTIC_")
            or (key.startswith("SLURM_") and key != "SLURM_CONF"))


def launcher_env(base: dict[str, str] | None = None, **settings: str) -> dict[str, str]:
    """The environment for a launcher: `base` (default: ours) without launcher leftovers, this interpreter (which
    has pope-lm) as PYTHON, plus `settings`."""
    env = {key: value for key, value in (base or os.environ).items() if not _leftover(key)}
    return {**env, "PYTHON": sys.executable, **settings}


def run_launcher(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch" / script), *args], env=env or launcher_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in a run directory, oldest first."""
    from pope_lm.checkpointing import CHECKPOINT_PATTERN, list_checkpoints

    return [int(CHECKPOINT_PATTERN.match(p.name).group(1)) for p in list_checkpoints(run_dir / "checkpoints")]


def mlflow_run_ids(run_dir: Path) -> list[str]:
    """The MLflow runs in a run directory's embedded store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    return [run.info.run_id for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
