"""`pope-lm train`: build data, model, tracking and checkpointing from a RunConfig and run Lightning's fit."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pope_lm.batch_size import SameMicroBatchOnEveryRank, resolve_micro_batch_size
from pope_lm.checkpointing import (
    BEST_CHECKPOINT,
    AlignStepsOnResume,
    AtomicCheckpointIO,
    PeriodicCheckpoint,
    checkpoint_state,
    load_model,
    resolve_resume,
)
from pope_lm.config import ConfigError, ModelConfig, RunConfig, config_from_container
from pope_lm.data import TokenDataModule
from pope_lm.lit_module import CONFIG_KEY
from pope_lm.monitoring import SpeedMonitor, peak_flops, progress_display
from pope_lm.strategy import (
    Preempted,
    StopOnSignal,
    accumulation_steps,
    build_strategy,
    check_launcher_geometry,
    cluster_plugins,
    lightning_module,
    resolve_strategy,
)
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


def set_matmul_precision(cfg: RunConfig, accelerator: str) -> None:
    """trainer.matmul_precision for this process's fp32 matrix products, on GPU only: on the CPU torch's setting
    would move them to bf16 through oneDNN at medium, so CPU runs keep full fp32."""
    if accelerator == "gpu":
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)


def compiles(cfg: RunConfig, accelerator: str) -> bool:
    """Whether the run torch.compiles its model: trainer.compile, or by default on GPU (the fast path: the Triton
    kernel is a custom op, so the model compiles as one graph), except under DeepSpeed ZeRO-3, which gathers each
    module's parameters in hooks around its forward (untried compiled). Under ZeRO-1/2 compiling took the 774m recipe
    from 50K to 62K tokens/s on one H100 and from 96K to 136K on two H200s (benchmarks/train_throughput_results.md,
    session 26)."""
    if cfg.trainer.compile is not None:
        return cfg.trainer.compile
    return accelerator == "gpu" and not (cfg.trainer.strategy == "deepspeed" and cfg.trainer.zero_stage == 3)


def train(cfg: RunConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the final logged metrics.

    `extra_callbacks` join pope-lm's own (benchmarks/scaleout.py measures through one).
    """
    run_dir = cfg.resolved_run_dir
    checkpoint_dir = run_dir / "checkpoints"
    accelerator = resolve_accelerator(cfg)
    if cfg.model.attention_backend == "triton" and accelerator != "gpu":
        raise ConfigError("'model.attention_backend' triton needs a GPU; use reference or auto on CPU")
    check_launcher_geometry(cfg)
    resume_path = resolve_resume(cfg.resume, checkpoint_dir)
    cfg = resolve_strategy(cfg, resume_path)  # like the micro-batch below: what runs is what gets logged and saved
    if resume_path is not None and resume_path.is_dir() != (cfg.trainer.strategy == "deepspeed"):
        kind, needed = ("a DeepSpeed (ZeRO)", "deepspeed") if resume_path.is_dir() else ("a native", "ddp or auto")
        raise ConfigError(f"{resume_path} is {kind} checkpoint; resume it with trainer.strategy={needed}")
    run_id, resumed_cfg = _resumed_entries(resume_path)
    if resumed_cfg is not None:
        _check_same_function(f"the checkpoint {resume_path}", config_from_container(resumed_cfg).model, cfg.model)
    precision = resolve_precision(cfg, accelerator)
    set_matmul_precision(cfg, accelerator)
    # auto becomes a number here, so that accumulation, DeepSpeed's config, the data module, the logged params and
    # the checkpoints' config all get the one that runs.
    auto_micro_batch = cfg.trainer.micro_batch_size == "auto"
    cfg = resolve_micro_batch_size(cfg, accelerator, precision, resumed_cfg)
    accumulate = accumulation_steps(cfg)
    strategy = build_strategy(cfg, accelerator, precision)
    run_dir.mkdir(parents=True, exist_ok=True)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = TokenDataModule(cfg.data, micro_batch_size=cfg.trainer.micro_batch_size, seed=cfg.seed)
    if datamodule.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"'model.vocab_size' ({cfg.model.vocab_size}) is smaller than the dataset's tokenizer vocabulary "
            f"({datamodule.vocab_size}, {datamodule.tokenizer_name})"
        )
    module = lightning_module(cfg)
    if cfg.init_from and resume_path is None:
        _start_from_weights(module, cfg)
    if compiles(cfg, accelerator):
        module.model = torch.compile(module.model, mode=cfg.trainer.compile_mode)  # type: ignore[assignment]

    # srun and torchrun start all ranks at once, and each would create (migrate) a new sqlite MLflow store
    # concurrently, which fails; a file lock lets one process at a time open it.
    with open(run_dir / ".mlflow.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        logger = build_logger(cfg, run_id)
    tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    stopper = StopOnSignal(every_n_steps=cfg.trainer.log_every_n_steps)
    checkpoints = PeriodicCheckpoint(checkpoint_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                                     cfg.checkpoint.keep_best)
    callbacks: list[L.Callback] = [
        checkpoints,
        AlignStepsOnResume(),
        SpeedMonitor(tokens_per_step, module.model.flops_per_token(cfg.data.seq_len),
                     peak_flops(cfg.trainer.peak_tflops), cfg.trainer.log_every_n_steps),
        progress_display(cfg.trainer.log_every_n_steps),
        stopper,
        *extra_callbacks,
    ]
    if logger is not None:
        callbacks.append(RunIdInCheckpoint(logger))
    if auto_micro_batch:
        callbacks.append(SameMicroBatchOnEveryRank(cfg.trainer.micro_batch_size))  # type: ignore[arg-type]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=strategy,
        precision=precision,  # type: ignore[arg-type]
        max_steps=cfg.trainer.max_steps,
        max_time=cfg.trainer.max_time or None,
        accumulate_grad_batches=accumulate,
        # The stream has no epochs, so validation runs every N micro-batches (= N / accumulate optimizer steps).
        val_check_interval=cfg.trainer.val_every_n_steps * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.data.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(background=cfg.checkpoint.background_write), *cluster_plugins()],
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
    if stopper.stopped and trainer.global_step < cfg.trainer.max_steps:
        raise Preempted(f"stopped on SIGUSR1 after step {trainer.global_step}, saved in {checkpoint_dir}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["step"] = trainer.global_step
    if cfg.trainer.test_at_end and datamodule.has_split("test"):
        metrics.update(_test(trainer, module, datamodule, cfg, checkpoints))
    if logger is not None and trainer.is_global_zero:
        log_run_end(logger, cfg, metrics)
    return metrics


def _test(trainer: L.Trainer, module: L.LightningModule, datamodule: TokenDataModule, cfg: RunConfig,
          checkpoints: PeriodicCheckpoint) -> dict[str, float]:
    """Score the test split with the last weights, or (trainer.test_on=best) with those of the best validation."""
    best = checkpoints.directory / BEST_CHECKPOINT
    if cfg.trainer.test_on == "best" and best.exists():
        log.info("testing %s (step %d, val/loss %.4f)", best, checkpoints.best_step, checkpoints.best_loss)
        (tested,) = trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True,
                                 verbose=trainer.is_global_zero)
        return {**tested, "test/step": float(checkpoints.best_step)}
    if cfg.trainer.test_on == "best":
        log.warning("no validation ran, so there is no best checkpoint: testing the last weights")
    (tested,) = trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero)
    return {**tested, "test/step": float(trainer.global_step)}


def _start_from_weights(module: L.LightningModule, cfg: RunConfig) -> None:
    """Fine-tuning: copy the weights of `init_from` (step, optimizer and schedule start fresh)."""
    pretrained, pretrained_cfg = load_model(cfg.init_from)
    _check_same_function(f"'init_from' {cfg.init_from}", pretrained_cfg.model, cfg.model)
    try:
        module.model.load_state_dict(pretrained.state_dict())
    except RuntimeError as exc:
        raise ConfigError(f"'init_from' {cfg.init_from} does not fit this run's model: "
                          f"{str(exc).splitlines()[1].strip()}") from None
    log.info("starting from the weights of %s", cfg.init_from)


# Model fields that change the function the weights compute, not (always) their shapes: a run that goes on from
# another's weights (a resume, or init_from) must keep them, since a strict load need not notice.
_FUNCTION_FIELDS = ("position", "activation")


def _check_same_function(source: str, saved: ModelConfig, current: ModelConfig) -> None:
    for field in _FUNCTION_FIELDS:
        if getattr(saved, field) != getattr(current, field):
            raise ConfigError(f"{source} was trained with model.{field}={getattr(saved, field)}; this run says "
                              f"{getattr(current, field)} (set model.{field}={getattr(saved, field)} to go on from it)")


def _resumed_entries(checkpoint: Path | None) -> tuple[str | None, dict[str, Any] | None]:
    """The MLflow run id and the run config stored in the checkpoint a run resumes from (None for a fresh run)."""
    if checkpoint is None:
        return None, None
    state = checkpoint_state(checkpoint)
    return state.get(RUN_ID_KEY), state.get(CONFIG_KEY)
