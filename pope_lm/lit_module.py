"""The Lightning module: next-token training of `GPT` with AdamW, warmup + cosine schedule and clipping."""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric

from pope_lm.config import OptimConfig, RunConfig, config_to_container
from pope_lm.model import GPT

CONFIG_KEY = "pope_lm_config"


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class LitGPT(L.LightningModule):
    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = GPT(cfg.model)
        self.val_loss = MeanMetric()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(batch[:, :-1], batch[:, 1:])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_loss.update(self.model(batch[:, :-1], batch[:, 1:]))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # averaged over every rank's batches
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss)}, prog_bar=True, sync_dist=False)

    def on_train_start(self) -> None:
        # Score the initial model so every run's curve starts from a measured point at step 0.
        if self.global_step == 0 and self.trainer.datamodule is not None:
            was_training = self.training
            self.eval()
            with torch.no_grad():
                for batch in self.trainer.datamodule.val_dataloader():
                    self.validation_step(batch.to(self.device), 0)
            loss = self.val_loss.compute()
            self.val_loss.reset()
            if self.logger is not None:
                self.logger.log_metrics({"val/loss": loss.item(), "val/ppl": math.exp(loss.item())}, step=0)
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
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.log("grad_norm", grad_norm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_phase_biases_()
        self.log("lr", self.lr_schedulers().get_last_lr()[0])  # type: ignore[union-attr]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The config travels with the weights, so evaluation and export rebuild the model from the file alone.
        checkpoint[CONFIG_KEY] = config_to_container(self.cfg)
        # RNG state makes dropout and any sampling continue exactly after a resume.
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": _python_state_to_plain(random.getstate()),
        }

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


# numpy and python RNG states hold numpy arrays and tuples; plain lists keep checkpoints loadable with
# torch.load(weights_only=True).
def _numpy_state_to_plain(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
