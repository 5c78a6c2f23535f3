"""The Lightning module: next-token training of `GPT` with AdamW, warmup + cosine schedule and clipping.

What is scored depends on the dataset: every next token of a text corpus, or, for question/answer datasets
whose manifest names an `answer_marker` (indirect indexing), only the token right after each marker, where
accuracy is logged too. Validation runs every `trainer.val_every_n_steps`; the test split, where the dataset
has one, is scored once after training (`test/loss` is the mean NLL per scored token, in nats).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy
from torchmetrics import MeanMetric

from pope_lm.config import OptimConfig, RunConfig, config_to_container
from pope_lm.model import GPT

CONFIG_KEY = "pope_lm_config"
IGNORE = -100  # cross_entropy's ignore_index: targets that are not scored


# torch.compile modes that replay the compiled graphs as CUDA graphs
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at decay_steps (default: max_steps),
    then min_lr until the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_end = cfg.decay_steps or max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_end - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def clip_gradients_(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float,
                    fold_into_step: bool) -> torch.Tensor:
    """Scale the gradients of `params` down to a global L2 norm of at most max_norm (0 or inf: no clipping), as
    `torch.nn.utils.clip_grad_norm_` does, and return their norm before clipping.

    With fold_into_step the scaling is not a pass of its own over the gradients: a fused optimizer that takes AMP's
    `grad_scale` divides each gradient by it as its kernel reads it (and stores the result back, so the gradients
    end up clipped as before). That saves a read of every gradient: 0.5 GB a step at 124M, 3 GB at 774M."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if 0 < max_norm < math.inf:
        if fold_into_step:
            optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp_(min=1.0)  # type: ignore[attr-defined]
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class LitGPT(L.LightningModule):
    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = GPT(cfg.model)
        self.answer_marker: int | None = None  # set from the data module in setup()
        # One pair of running means serves validation and test, which never run at the same time.
        self.eval_loss = MeanMetric()
        self.eval_accuracy = MeanMetric()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def setup(self, stage: str) -> None:
        self.answer_marker = getattr(self.trainer.datamodule, "answer_marker", None)

    def score(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean cross-entropy of the scored targets of a (B, T + 1) batch, and for answer datasets the accuracy."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if self.answer_marker is None:
            return self.model(inputs, targets), None  # the model's own loss: compiled together with the head
        targets = targets.masked_fill(inputs != self.answer_marker, IGNORE)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        scored = targets != IGNORE
        # Counted with a mask, not by indexing with it: boolean indexing would wait for the device every step.
        accuracy = ((logits.argmax(-1) == targets) & scored).sum() / scored.sum()
        return loss, accuracy

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, accuracy = self.score(batch)
        # Not prog_bar: Lightning reads progress-bar values to the host after every step, which would wait for the
        # GPU each time; the progress display shows the loss at its refresh points instead.
        # A copy: under trainer.compile_mode=reduce-overhead the loss lives in the CUDA graph's output memory,
        # which the next step's replay overwrites before a lazy reader (the progress bar) gets to it.
        self.log("train/loss", loss.detach().clone())
        if accuracy is not None:
            self.log("train/accuracy", accuracy)
        skipped = getattr(self.trainer.datamodule, "skipped_shards", 0)
        if skipped:
            log_host_value(self, "data/skipped_shards", float(skipped))
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._update_eval(batch)
        if batch_idx == 0:
            self._log_attention_logits(batch[:1, :-1])

    def _log_attention_logits(self, idx: torch.Tensor) -> None:
        """`attn/max_logit` (and per layer `attn/max_logit/layer_<i>`) on one validation sequence.

        Run eager on the uncompiled model, so the compiled graph stays as it is. Not under ZeRO-3, whose
        partitioned weights are gathered only inside the engine's own forward."""
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            return
        model = getattr(self.model, "_orig_mod", self.model)  # torch.compile's wrapper keeps the module here
        maxima = model.max_attention_logits(idx).float()  # bf16 under autocast; reduced and logged as fp32
        # The largest over the ranks' sequences: one small all-reduce per value, once per validation.
        self.log("attn/max_logit", maxima.amax(), sync_dist=True, reduce_fx="max")
        for layer, value in enumerate(maxima):
            self.log(f"attn/max_logit/layer_{layer}", value, sync_dist=True, reduce_fx="max")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._update_eval(batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _update_eval(self, batch: torch.Tensor) -> None:
        loss, accuracy = self.score(batch)
        self.eval_loss.update(loss)
        if accuracy is not None:
            self.eval_accuracy.update(accuracy)

    def _eval_results(self, split: str) -> dict[str, torch.Tensor]:
        """The running means (over every rank's batches) as `{split}/loss`, `/ppl` and `/accuracy`; resets them."""
        loss = self.eval_loss.compute()
        results = {f"{split}/loss": loss, f"{split}/ppl": torch.exp(loss)}
        if self.answer_marker is not None:
            results[f"{split}/accuracy"] = self.eval_accuracy.compute()
        self.eval_loss.reset()
        self.eval_accuracy.reset()
        return results

    def _log_eval(self, split: str) -> None:
        self.log_dict(self._eval_results(split), prog_bar=True, sync_dist=False)

    def on_train_start(self) -> None:
        # Score the initial model so every run's curve starts from a measured point at step 0. In the precision the
        # validation steps run in (Lightning sets it up around its steps, not around this hook): without autocast,
        # a bf16-mixed run would score step 0 in fp32, compile a graph for it, and on the GPU launch fp32 attention
        # kernels whose spills make CUDA reserve ~7 GB of local memory for the rest of the run.
        if self.global_step == 0 and self.trainer.datamodule is not None:
            was_training = self.training
            self.eval()
            with torch.no_grad(), self.trainer.precision_plugin.val_step_context():
                for batch in self.trainer.datamodule.val_dataloader():
                    self._update_eval(batch.to(self.device))
            results = self._eval_results("val")
            if self.logger is not None:
                self.logger.log_metrics({k: v.item() for k, v in results.items()}, step=0)
            self.train(was_training)

    def configure_optimizers(self) -> dict[str, Any]:
        ocfg = self.cfg.optim
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            # Weight decay on matrices and embeddings only: not on norm gains or PoPE's phase biases.
            is_matrix = param.dim() >= 2 and ".position." not in name
            (decay if is_matrix else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            groups, lr=ocfg.lr, betas=(ocfg.beta1, ocfg.beta2), eps=ocfg.eps,
            fused=self.device.type == "cuda" or None,
        )
        max_steps = self.cfg.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, ocfg, max_steps) / ocfg.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Folded into a fused AdamW's kernel unless a GradScaler (16-mixed) is in charge of its grad_scale.
        fold = (getattr(optimizer, "_step_supports_amp_scaling", False)
                and getattr(self.trainer.precision_plugin, "scaler", None) is None)
        grad_norm = clip_gradients_(optimizer, list(self.model.parameters()), self.cfg.optim.grad_clip, fold)
        self.log("grad_norm", grad_norm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if not isinstance(self.trainer.strategy, DeepSpeedStrategy) and not self._keeps_gradients():
            # (DeepSpeed's engine owns and clears them.) Lightning zeroes the gradients inside the next step, after
            # its forward pass, so they would stay alive through it: one fp32 copy of the parameters on top of the
            # activations at peak (2.9 GB at 774M).
            self.optimizers().zero_grad(set_to_none=True)  # type: ignore[union-attr]
        self.model.clamp_phase_biases_()
        log_host_value(self, "lr", self.lr_schedulers().get_last_lr()[0])  # type: ignore[union-attr]

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if not self._keeps_gradients():
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None and param.requires_grad:
                    param.grad = torch.zeros_like(param)
        optimizer.zero_grad(set_to_none=False)

    def _keeps_gradients(self) -> bool:
        """Whether .grad stays allocated between steps (zeroed in place): when a compiled model replays CUDA graphs
        and micro-batches accumulate.

        A CUDA graph's backward returns the gradients in the graph's own output memory, which its next replay
        overwrites. With .grad freed, the first micro-batch's gradient would be installed as .grad as it is (autograd
        adopts an incoming gradient when nothing is there), and the next micro-batch's replay would overwrite it
        before adding to it: torch stops with "accessing tensor output of CUDAGraphs that has been overwritten"
        (pytorch/pytorch#169545). Added into a .grad of its own instead, each gradient is read before the next
        replay. The cost is the fp32 gradients alive through the forward pass (0.5 GB at 124M, 2.9 GB at 774M)."""
        return (self.cfg.trainer.compile_mode in CUDA_GRAPH_COMPILE_MODES and hasattr(self.model, "_orig_mod")
                and self.trainer.accumulate_grad_batches > 1
                and not isinstance(self.trainer.strategy, DeepSpeedStrategy))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The config travels with the weights, so evaluation and export rebuild the model from the file alone.
        checkpoint[CONFIG_KEY] = config_to_container(self.cfg)
        if "state_dict" in checkpoint:  # (DeepSpeed saves its own)
            # Names without torch.compile's wrapper, so that compiled and uncompiled runs resume each other's
            # checkpoints (trainer.compile defaults to on for GPUs, off for CPUs).
            checkpoint["state_dict"] = {uncompiled_name(k): v for k, v in checkpoint["state_dict"].items()}
        # RNG state makes dropout and any sampling continue exactly after a resume.
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": _python_state_to_plain(random.getstate()),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load weights named with or without torch.compile's `_orig_mod.`, whichever this module uses.

        Lightning loads a native checkpoint through here (saved without it: on_save_checkpoint), and DeepSpeed's
        engine a ZeRO checkpoint's module weights (saved as the engine's module names them). So compiled and
        uncompiled runs resume each other's checkpoints: trainer.compile defaults to on for GPUs, off for CPUs and
        under ZeRO-3, and a run may change it."""
        own = {uncompiled_name(k): k for k in self.state_dict()}
        renamed = {own.get(uncompiled_name(k), k): v for k, v in state_dict.items()}
        return super().load_state_dict(renamed, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state((rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
        version, state, gauss = rng["python"]
        random.setstate((version, tuple(state), gauss))


def uncompiled_name(key: str) -> str:
    """A parameter's name without the `_orig_mod.` that torch.compile's wrapper module inserts."""
    return key.replace("_orig_mod.", "")


def log_host_value(module: L.LightningModule, name: str, value: float, **kwargs: Any) -> None:
    """`module.log` for a number the host already holds, without a device synchronization.

    Lightning turns a plain number into a tensor on the module's device: a blocking host-to-device copy that makes
    the host wait for every queued kernel, each step. A CPU tensor stays on the CPU (Lightning keeps a logged
    value on the device it came from), so the host keeps queueing work ahead of the GPU.
    """
    module.log(name, torch.tensor(value, dtype=torch.float32), **kwargs)


# numpy and python RNG states hold numpy arrays and tuples; plain lists keep checkpoints loadable with
# torch.load(weights_only=True).
def _numpy_state_to_plain(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
