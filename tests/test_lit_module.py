"""LitGPT's optimizer step under a Lightning Trainer on the CPU: what it frees and what it accumulates."""

from __future__ import annotations

import lightning as L
import torch
from launch_helpers import TINY

from pope_lm.config import load_config
from pope_lm.lit_module import LitGPT

SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.head_dim=16", "data.seq_len=16",
         "model.vocab_size=64", "optim.warmup_steps=1"]


class _GradientsAfterStep(L.Callback):
    """Records, after each optimizer step, whether any parameter still holds a gradient."""

    def __init__(self) -> None:
        self.held: list[bool] = []
        self._step = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.held.append(any(p.grad is not None for p in pl_module.parameters()))


def _train_one_step(batches: list[torch.Tensor], accumulate: int, callback: L.Callback | None = None) -> LitGPT:
    torch.manual_seed(0)
    module = LitGPT(load_config(TINY, SMALL))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[callback] if callback else [])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module


def test_gradients_are_freed_right_after_the_optimizer_step() -> None:
    # Lightning would zero them only inside the next step, after its forward: one gradient copy more at peak.
    batch = torch.randint(0, 64, (4, 17))
    probe = _GradientsAfterStep()
    _train_one_step([batch], accumulate=1, callback=probe)
    assert probe.held == [False]


def test_accumulated_micro_batches_step_like_one_batch() -> None:
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    whole = _train_one_step([batch], accumulate=1)
    halves = _train_one_step([batch[:2], batch[2:]], accumulate=2)
    for (name, a), b in zip(whole.named_parameters(), halves.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
