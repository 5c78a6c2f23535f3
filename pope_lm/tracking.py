"""MLflow tracking: one MLflow run per training run, continued across resumes.

By default the store is embedded in the run directory (`sqlite:///<run_dir>/mlflow.db`, artifacts in
`<run_dir>/mlartifacts`); `tracking.uri` points at a server instead. The MLflow run id is written into
every checkpoint, so a resumed run logs into the run it continues.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from pope_lm.config import RunConfig, config_to_yaml, flatten

RUN_ID_KEY = "mlflow_run_id"


def tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.uri or f"sqlite:///{(cfg.resolved_run_dir / 'mlflow.db').resolve()}"


def build_logger(cfg: RunConfig, run_id: str | None) -> MLFlowLogger | None:
    if not cfg.tracking.enabled:
        return None
    artifacts = None if cfg.tracking.uri else (cfg.resolved_run_dir / "mlartifacts").resolve().as_uri()
    return MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or cfg.resolved_run_dir.name,
        tracking_uri=tracking_uri(cfg),
        artifact_location=artifacts,
        run_id=run_id,
    )


def log_run_start(logger: MLFlowLogger, cfg: RunConfig, resumed: bool) -> None:
    """Params (the flattened config) and the resolved config as an artifact; params are logged once per run."""
    config_file = cfg.resolved_run_dir / "config.yaml"
    config_file.write_text(config_to_yaml(cfg))
    if not resumed:
        logger.log_hyperparams(flatten(cfg))
    logger.experiment.log_artifact(logger.run_id, str(config_file))


def log_run_end(logger: MLFlowLogger, cfg: RunConfig, metrics: dict[str, Any]) -> None:
    path = cfg.resolved_run_dir / "final_metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    logger.experiment.log_artifact(logger.run_id, str(path))


class RunIdInCheckpoint(L.Callback):
    """Store the MLflow run id in each checkpoint so `resume` continues the same MLflow run."""

    def __init__(self, logger: MLFlowLogger) -> None:
        self.logger = logger

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_ID_KEY] = self.logger.run_id


__all__ = ["RunIdInCheckpoint", "build_logger", "log_run_end", "log_run_start", "tracking_uri"]
