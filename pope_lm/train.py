"""`pope-lm train`: build data, model, tracking and checkpointing from a RunConfig and run Lightning's fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pope_lm.checkpointing import AtomicCheckpointIO, PeriodicCheckpoint, resolve_resume
from pope_lm.config import ConfigError, RunConfig
from pope_lm.data import TokenDataModule
from pope_lm.lit_module import LitGPT
from pope_lm.monitoring import SpeedMonitor, StepProgressBar, peak_flops
from pope_lm.tracking import RUN_ID_KEY, RunIdInCheckpoint, build_logger, log_run_end, log_run_start

log = logging.getLogger("pope_lm")


def resolve_accelerator(cfg: RunConfig) -> str:
    if cfg.trainer.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("'trainer.accelerator' is gpu but no CUDA device is available")
    return cfg.trainer.accelerator


def resolve_precision(cfg: RunConfig, accelerator: str) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if accelerator == "gpu" else "32-true"


def accumulation_steps(cfg: RunConfig) -> int:
    """Micro-batches per optimizer step so that micro x world size x accumulation = global batch."""
    t = cfg.trainer
    world = t.devices * t.num_nodes
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"'trainer.global_batch_size' ({t.global_batch_size}) is not divisible by micro_batch_size x world size "
            f"({t.micro_batch_size} x {world} = {per_step})"
        )
    return t.global_batch_size // per_step


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the final logged metrics."""
    run_dir = cfg.resolved_run_dir
    checkpoint_dir = run_dir / "checkpoints"
    accelerator = resolve_accelerator(cfg)
    if cfg.model.attention_backend == "triton" and accelerator != "gpu":
        raise ConfigError("'model.attention_backend' triton needs a GPU; use reference or auto on CPU")
    accumulate = accumulation_steps(cfg)
    resume_path = resolve_resume(cfg.resume, checkpoint_dir)
    run_id = _stored_run_id(resume_path)
    run_dir.mkdir(parents=True, exist_ok=True)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = TokenDataModule(cfg.data, micro_batch_size=cfg.trainer.micro_batch_size, seed=cfg.seed)
    if datamodule.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"'model.vocab_size' ({cfg.model.vocab_size}) is smaller than the dataset's tokenizer vocabulary "
            f"({datamodule.vocab_size}, {datamodule.tokenizer_name})"
        )
    module = LitGPT(cfg)
    if cfg.trainer.compile:
        module.model = torch.compile(module.model)  # type: ignore[assignment]

    logger = build_logger(cfg, run_id)
    tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    callbacks: list[L.Callback] = [
        PeriodicCheckpoint(checkpoint_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last),
        SpeedMonitor(tokens_per_step, module.model.flops_per_token(cfg.data.seq_len),
                     peak_flops(cfg.trainer.peak_tflops), cfg.trainer.log_every_n_steps),
        StepProgressBar(refresh_rate=cfg.trainer.log_every_n_steps),
    ]
    if logger is not None:
        callbacks.append(RunIdInCheckpoint(logger))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=resolve_precision(cfg, accelerator),  # type: ignore[arg-type]
        max_steps=cfg.trainer.max_steps,
        accumulate_grad_batches=accumulate,
        # The stream has no epochs, so validation runs every N micro-batches (= N / accumulate optimizer steps).
        val_check_interval=cfg.trainer.val_every_n_steps * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.data.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,  # PeriodicCheckpoint does it, atomically
        use_distributed_sampler=False,  # the data module splits the stream across ranks itself
        default_root_dir=str(run_dir),
        deterministic=cfg.trainer.deterministic,
        enable_model_summary=False,
    )
    if logger is not None and trainer.is_global_zero:
        log_run_start(logger, cfg, resumed=run_id is not None)
    if resume_path is not None and trainer.is_global_zero:
        log.info("resuming from %s", resume_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["step"] = trainer.global_step
    if logger is not None and trainer.is_global_zero:
        log_run_end(logger, cfg, metrics)
    return metrics


def _stored_run_id(checkpoint: Path | None) -> str | None:
    if checkpoint is None:
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return state.get(RUN_ID_KEY)
