"""How a run is spread over processes: batch geometry, the Lightning strategy (DDP or DeepSpeed ZeRO), the
launcher's cluster environment, and stopping cleanly when Slurm warns that the time limit is near.

The recipe states the global batch in sequences; the micro-batch is per process, and accumulation fills the
rest: micro x world size x accumulation = global batch. The world size is what the launcher (srun or torchrun)
started, and it must equal trainer.devices x trainer.num_nodes (`check_launcher_geometry`).

Under DeepSpeed the engine owns the gradients and the fp32 master weights, so `DeepSpeedLitGPT` leaves clipping
to DeepSpeed and keeps PoPE's phase bias inside [-2 pi, 0] in the master copy (`clamp_sharded_phase_biases_`), and
`LossScaledOnceDeepSpeedPrecision` divides the loss by the accumulation once, as under DDP (docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import Strategy
from torch import nn

from pope_lm.config import ConfigError, RunConfig
from pope_lm.lit_module import LitGPT
from pope_lm.model import GPT, MLP
from pope_lm.position import PoPE

log = logging.getLogger("pope_lm")

# Precisions DeepSpeed can run, and the section of its config each one enables.
_DEEPSPEED_PRECISION = {
    "32-true": None, "bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16-true": "fp16",
}

# Keys the recipe owns: the data pipeline, Lightning and LitGPT act on the recipe's values, so a user's JSON may not
# set these to something else. Each maps to the recipe key to change instead.
_RECIPE_OWNED = {
    ("train_batch_size",): "trainer.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "trainer.micro_batch_size",
    ("gradient_accumulation_steps",): "trainer.global_batch_size / trainer.micro_batch_size",
    ("gradient_clipping",): "optim.grad_clip",
    ("optimizer",): "the optim section (LitGPT builds AdamW with its weight-decay groups)",
    ("scheduler",): "the optim section (LitGPT's warmup + cosine schedule)",
    ("bf16", "enabled"): "trainer.precision",
    ("fp16", "enabled"): "trainer.precision",
    ("zero_optimization", "stage"): "trainer.zero_stage",
}


def world_size(cfg: RunConfig) -> int:
    """The processes of a run: trainer.devices per node x trainer.num_nodes (what `check_launcher_geometry` holds
    the launcher to)."""
    return cfg.trainer.devices * cfg.trainer.num_nodes


def accumulation_steps(cfg: RunConfig) -> int:
    """Micro-batches per optimizer step so that micro x world size x accumulation = global batch."""
    t = cfg.trainer
    if not isinstance(t.micro_batch_size, int):  # train() resolves auto (pope_lm/batch_size.py) before this is asked
        raise TypeError(f"trainer.micro_batch_size={t.micro_batch_size} is not resolved to a number yet")
    world = world_size(cfg)
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"'trainer.global_batch_size' ({t.global_batch_size}) is not divisible by micro_batch_size x world size "
            f"({t.micro_batch_size} x {world} = {per_step})"
        )
    return t.global_batch_size // per_step


def resolve_strategy(cfg: RunConfig, resume_path: Path | None) -> RunConfig:
    """`cfg` with trainer.strategy replaced by auto (Lightning's single-device strategy) where the one named has nothing
    to do, so that the strategy logged and saved with the run is the one that trains:
    - ddp on one process: with nothing to all-reduce, DDP would only copy the gradients into its buckets and, under
      torch.compile, have dynamo's DDPOptimizer split the model's graph at bucket boundaries, which costs fusions and
      adds a CUDA graph per piece;
    - deepspeed with ZeRO-1/2 on one process, which shard over a single rank. Its engine still copies every
      micro-batch's gradients into its buckets and steps flat fp32 copies of the weights: on one H100 the 774m recipe
      trained at 62K tokens/s under ZeRO-2 against 80K single-device, both compiled
      (benchmarks/train_throughput_results.md, session 26). DeepSpeed stays for what it does on one process too
      (ZeRO-3, CPU offload, a DeepSpeed JSON's settings) and to resume one of its checkpoint directories, which only
      its engine reads."""
    t = cfg.trainer
    if world_size(cfg) > 1 or t.strategy == "auto":
        return cfg
    if t.strategy == "ddp":
        log.info("trainer.strategy=ddp -> auto: one process has nothing to all-reduce, so this run trains with the "
                 "single-device strategy")
    elif (t.zero_stage == 3 or t.offload_optimizer or t.deepspeed_config
          or (resume_path is not None and resume_path.is_dir())):
        return cfg
    else:
        log.info("trainer.strategy=deepspeed -> auto: ZeRO-%d on one process shards nothing, so this run trains with "
                 "the single-device strategy (checkpoints are files)", t.zero_stage)
    return replace(cfg, trainer=replace(t, strategy="auto"))


def deepspeed_config(cfg: RunConfig, precision: str) -> dict[str, Any]:
    """The complete DeepSpeed config of a run: generated from the recipe, then trainer.deepspeed_config merged over it.

    It is what `deepspeed.initialize` takes directly; `build_strategy` hands it to Lightning.
    """
    t = cfg.trainer
    if precision not in _DEEPSPEED_PRECISION:
        raise ConfigError(f"'trainer.precision' {precision} is not supported by DeepSpeed; use one of "
                          f"{', '.join(_DEEPSPEED_PRECISION)}")
    zero: dict[str, Any] = {
        "stage": t.zero_stage,
        # Reduce gradient buckets while the backward pass still runs, into one contiguous buffer (no fragmentation).
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if t.zero_stage == 3:
        zero.update(zero3_buffer_sizes(cfg.model.d_model))
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(cfg),
        "gradient_clipping": cfg.optim.grad_clip,  # by global norm, at the accumulation boundary; 0 disables it
        "zero_optimization": zero,
        # The optimizer is LitGPT's AdamW (decay groups, schedule), which ZeRO calls "untested" unless allowed.
        "zero_allow_untested_optimizer": True,
        # Lightning and MLflow log progress; DeepSpeed's own per-step prints would only flood the job log.
        "steps_per_print": 2**31 - 1,
    }
    section = _DEEPSPEED_PRECISION[precision]
    if section is not None:
        config[section] = {"enabled": True}
    if t.deepspeed_config:
        _merge(config, _load_user_config(Path(t.deepspeed_config)))
    return config


def zero3_buffer_sizes(d_model: int) -> dict[str, int]:
    """ZeRO-3's communication buffers and gathered-parameter limits scaled to the model, in elements.

    DeepSpeed's defaults are sized for models of many billions: a 5e8-element gradient bucket (1 GB in bf16) and up
    to 1e9 gathered parameters kept alive between uses, more than all of a 774M model, so every layer gathered in
    the forward stays whole until its backward: the whole model's bf16 weights at peak, as without ZeRO-3. Here
    buckets hold about one d x d matrix (the scheme of Hugging Face's "auto" values) and a gathered layer is
    released unless it is needed again within four layers' worth of parameters (12 d^2 per layer). Override any of
    them through trainer.deepspeed_config.
    """
    layer = 12 * d_model * d_model
    return {
        "reduce_bucket_size": d_model * d_model,
        "stage3_prefetch_bucket_size": int(0.9 * d_model * d_model),
        "stage3_param_persistence_threshold": 10 * d_model,  # smaller tensors (norm gains, biases) stay gathered
        "stage3_max_live_parameters": 4 * layer,
        "stage3_max_reuse_distance": 4 * layer,
    }


def _load_user_config(path: Path) -> dict[str, Any]:
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"'trainer.deepspeed_config' file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"'trainer.deepspeed_config' {path} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"'trainer.deepspeed_config' {path} must hold a JSON object, not {type(user).__name__}")
    for keys, owner in _RECIPE_OWNED.items():
        node: Any = user
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"'{'.'.join(keys)}' in {path} is set by the recipe; change {owner} instead")
    return user


def _merge(base: dict[str, Any], override: dict[str, Any]) -> None:
    """Recursive update: nested sections merge key by key, anything else in `override` replaces."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def build_strategy(cfg: RunConfig, accelerator: str, precision: str) -> str | Strategy:
    """The Lightning strategy of a run `resolve_strategy` has resolved: the name for auto and ddp, a configured
    DeepSpeedStrategy for deepspeed."""
    if cfg.trainer.strategy != "deepspeed":
        return cfg.trainer.strategy
    if accelerator != "gpu":
        raise ConfigError("'trainer.strategy' deepspeed needs GPUs (Lightning's DeepSpeedStrategy refuses the CPU); "
                          "use ddp on CPU")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    config = deepspeed_config(cfg, precision)
    # Lightning refuses this key and sets it itself from Trainer(accumulate_grad_batches=accumulation_steps(cfg)).
    del config["gradient_accumulation_steps"]
    return DeepSpeedStrategy(config=config, precision_plugin=LossScaledOnceDeepSpeedPrecision(precision))  # type: ignore[arg-type]


class LossScaledOnceDeepSpeedPrecision(DeepSpeedPrecision):
    """Lightning's DeepSpeed precision, with the loss divided by the accumulation steps once instead of twice.

    Lightning divides each micro-batch loss by accumulate_grad_batches, and DeepSpeed's engine.backward divides it by
    gradient_accumulation_steps again: gradients 1/accumulation of DDP's, which raises the effective clipping
    threshold by that factor (and Adam's steps change wherever the clip no longer applies). DeepSpeed's own
    division is switched off, so the curves match DDP's.
    """

    def backward(self, tensor: torch.Tensor, model: L.LightningModule, optimizer: Any, *args: Any,
                 **kwargs: Any) -> None:
        super().backward(tensor, model, optimizer, *args, scale_wrt_gas=False, **kwargs)


def _under_srun() -> bool:
    """`SLURMEnvironment.detect()` without its hint to prepend srun: the Trainer's own detection gives that once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PossibleUserWarning)
        return SLURMEnvironment.detect()


def cluster_plugins() -> list[ClusterEnvironment]:
    """Under srun: Lightning's SLURMEnvironment with its auto-requeue off.

    Lightning's auto-requeue saves `hpc_ckpt_*.ckpt` from inside the signal handler (mid-step, with collectives)
    and loads such a file before any `ckpt_path`, which would compete with `resume=auto`; `StopOnSignal` and
    launch/slurm.sh do the requeue instead. torchrun wins when both are present, as in Lightning's own detection.
    """
    if _under_srun() and not TorchElasticEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def check_launcher_geometry(cfg: RunConfig) -> None:
    """Fail with one line when the recipe's devices x num_nodes is not what srun or torchrun started."""
    if TorchElasticEnvironment.detect():
        launcher, world, per_node = "torchrun", int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    elif _under_srun():
        launcher, world = "srun", int(os.environ["SLURM_NTASKS"])
        per_node = world // int(os.environ.get("SLURM_NNODES", "1"))
    else:
        return  # Lightning starts the processes itself, as many as trainer.devices says
    t = cfg.trainer
    if (t.devices, t.num_nodes) != (per_node, world // per_node):
        raise ConfigError(
            f"{launcher} started {world} processes ({per_node} per node) but 'trainer.devices' x 'trainer.num_nodes' "
            f"is {t.devices} x {t.num_nodes}; pass trainer.devices={per_node} trainer.num_nodes={world // per_node}"
        )


def register_zero3_external_parameters(model: GPT) -> None:
    """Tell ZeRO-3 about the parameters that a module other than their owner reads.

    ZeRO-3 gathers a module's parameters around its own forward(). Some are read elsewhere:
    - the embedding matrix, by GPT.forward (the tied output head);
    - PoPE's delta, by the attention module (through PoPE.attend);
    - on CUDA with gelu_tanh, the MLP's two Linear weights, which MLP.forward hands to the fused cuBLASLt op without
      calling the Linears.
    DeepSpeed discovers such uses only inside the engine's forward. LitGPT.on_train_start also calls the model
    directly, where they would be empty shards. Registered, they are gathered with the module that reads them."""
    import deepspeed

    deepspeed.zero.register_external_parameter(model, model.embedding.weight)
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, PoPE):
                deepspeed.zero.register_external_parameter(parent, child.delta)
        if isinstance(parent, MLP):
            for linear in (parent.up, parent.down):
                deepspeed.zero.register_external_parameter(parent, linear.weight)


def lightning_module(cfg: RunConfig) -> LitGPT:
    """The LightningModule for the run's strategy."""
    return DeepSpeedLitGPT(cfg) if cfg.trainer.strategy == "deepspeed" else LitGPT(cfg)


class DeepSpeedLitGPT(LitGPT):
    """LitGPT for DeepSpeed, whose engine holds the gradients and the fp32 master weights (partitioned under ZeRO)."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        if cfg.trainer.zero_stage == 3:
            register_zero3_external_parameters(self.model)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # DeepSpeed clips ("gradient_clipping" = optim.grad_clip) at the accumulation boundary. Under DeepSpeed
        # Lightning calls this hook on every micro-batch, where param.grad is partial (ZeRO-1) or already moved
        # into ZeRO's buckets (ZeRO-2/3), so LitGPT's manual clip must not run.
        return

    def configure_optimizers(self) -> dict[str, Any]:
        spec = super().configure_optimizers()
        if "offload_optimizer" not in self.trainer.strategy.config["zero_optimization"]:  # type: ignore[attr-defined]
            return spec
        # Offloaded optimizer states live in CPU memory, where DeepSpeed's vectorised CPU Adam is several times
        # faster than torch's AdamW (and ZeRO-Offload refuses torch optimizers by default). Same groups, same schedule.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        adamw, schedule = spec["optimizer"], spec["lr_scheduler"]["scheduler"]
        cpu_adam = DeepSpeedCPUAdam(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adamw.param_groups],
            lr=adamw.defaults["lr"], betas=adamw.defaults["betas"], eps=adamw.defaults["eps"], adamw_mode=True,
        )
        spec["optimizer"] = cpu_adam
        spec["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(cpu_adam, schedule.lr_lambdas)
        return spec

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # runs every micro-batch; the engine steps at the boundary only
        engine = self.trainer.strategy.deepspeed_engine  # type: ignore[attr-defined]
        if engine.was_step_applied():
            clamp_sharded_phase_biases_(self.model)
            norm = engine.get_global_grad_norm()  # before clipping, as LitGPT logs it without DeepSpeed
            if norm is not None:
                self.log("grad_norm", norm)  # a device tensor is read only at the logging interval


def clamp_sharded_phase_biases_(model: nn.Module) -> None:
    """Project every PoPE delta into [-2 pi, 0] in the copies a DeepSpeed ZeRO engine keeps; call after each step.

    After a step DeepSpeed overwrites the module's parameter from its fp32 master weights, so clamping only the
    parameter (what `GPT.clamp_phase_biases_` does) lets the master drift out of range, where delta receives no
    gradient (the attention clamps it) and stays, unlike in DDP. Clamping is elementwise, so it applies shard by shard.
    """
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    for module in model.modules():
        if not isinstance(module, PoPE):
            continue
        param = module.delta
        if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's shard of the working copy and of the fp32 master
            param.ds_tensor.data.clamp_(PoPE.DELTA_MIN, PoPE.DELTA_MAX)
            master = safe_get_local_fp32_param(param)
            safe_set_local_fp32_param(param, master.clamp(PoPE.DELTA_MIN, PoPE.DELTA_MAX))
        else:  # ZeRO-1/2: a full working copy on every rank, the fp32 master partitioned (gathered: a collective)
            param.data.clamp_(PoPE.DELTA_MIN, PoPE.DELTA_MAX)
            master = safe_get_full_fp32_param(param)
            safe_set_full_fp32_param(param, master.clamp(PoPE.DELTA_MIN, PoPE.DELTA_MAX))


class Preempted(Exception):
    """Training stopped on the requeue signal after saving a checkpoint; the run is not finished."""


class StopOnSignal(L.Callback):
    """On SIGUSR1 (what `sbatch --signal=USR1@<seconds>` sends before the time limit), stop after an optimizer step.

    Training then ends normally, so PeriodicCheckpoint saves that step as an ordinary `step-*.ckpt` that
    `resume=auto` finds; `stopped` tells `train` to raise Preempted, and the CLI exits with the code on which
    launch/slurm.sh requeues the job.
    """

    def __init__(self, every_n_steps: int, signum: signal.Signals = signal.SIGUSR1) -> None:
        self.every_n_steps = every_n_steps
        self.signum = signum
        self.received = False  # set by the handler of this process
        self.stopped = False  # every rank agreed to stop
        self._previous: Any = None
        self._last_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            self._previous = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = True  # only a flag: a handler can run mid-step, where saving or a collective is unsafe

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Decide right after an optimizer step: with accumulation, stopping between micro-batches would drop their
        # gradients from the checkpoint. Ranks receive the signal at different points of a step, so they agree by
        # an any-reduction and all stop after the same step. The reduction waits for the device, so it runs every
        # `every_n_steps` steps (the logging interval, which synchronizes anyway) rather than after each one.
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if step % self.every_n_steps == 0 and trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self.stopped = trainer.should_stop = True
