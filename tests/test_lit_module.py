"""LitGPT's optimizer: the learning-rate schedule, and its step under a Lightning Trainer on the CPU (what it frees
and what it accumulates)."""

from __future__ import annotations

import lightning as L
import torch
from launch_helpers import TINY

from pope_lm.config import OptimConfig, load_config
from pope_lm.lit_module import LitGPT, clip_gradients_, lr_at

SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.head_dim=16", "data.seq_len=16",
         "model.vocab_size=64", "optim.warmup_steps=1"]


def test_schedule_warms_up_then_decays_to_min_lr_at_max_steps() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 110) == 0.1 and lr_at(9, cfg, 110) == 1.0
    assert lr_at(60, cfg, 110) == 0.55  # halfway through the cosine
    assert lr_at(110, cfg, 110) == 0.1


def test_decay_steps_end_the_cosine_early_and_hold_min_lr_until_the_end() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=60)
    assert lr_at(35, cfg, 1000) == lr_at(60, OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10), 110) == 0.55
    assert [lr_at(step, cfg, 1000) for step in (60, 500, 999)] == [0.1, 0.1, 0.1]


class _GradientsAfterStep(L.Callback):
    """Records, after each optimizer step, whether any parameter still holds a gradient."""

    def __init__(self) -> None:
        self.held: list[bool] = []
        self._step = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.held.append(any(p.grad is not None for p in pl_module.parameters()))


def _train_one_step(batches: list[torch.Tensor], accumulate: int, callback: L.Callback | None = None,
                    overrides: tuple[str, ...] = (), compiled: bool = False, steps: int = 1) -> LitGPT:
    torch.manual_seed(0)
    module = LitGPT(load_config(TINY, [*SMALL, *overrides]))
    if compiled:  # dynamo's wrapper, without inductor: what LitGPT sees of a compiled model, compiled in no time
        module.model = torch.compile(module.model, backend="eager")  # type: ignore[assignment]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate,
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


class _GradientStorage(L.Callback):
    """Records each parameter's .grad storage before every backward (None where there is no .grad)."""

    def __init__(self) -> None:
        self.seen: list[list[int | None]] = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.seen.append([None if p.grad is None else p.grad.data_ptr() for p in pl_module.parameters()])


def test_gradients_stay_allocated_when_cuda_graphs_replay_accumulated_micro_batches() -> None:
    # Every micro-batch's gradient is added into a .grad of its own, never adopted from the graph's output memory
    # that the next replay overwrites (pytorch/pytorch#169545); the first backward already finds one.
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    probe = _GradientStorage()
    graphed = _train_one_step([batch[:2], batch[2:]], accumulate=2, callback=probe, steps=2, compiled=True,
                              overrides=("trainer.compile_mode=reduce-overhead",))
    assert len(probe.seen) == 4 and None not in probe.seen[0]
    assert all(seen == probe.seen[0] for seen in probe.seen)
    # and the steps are the ones freed gradients take
    freed = _train_one_step([batch[:2], batch[2:]], accumulate=2, steps=2, compiled=True)
    for (name, a), b in zip(graphed.named_parameters(), freed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_gradients_are_freed_between_steps_without_accumulation_under_cuda_graphs() -> None:
    batch = torch.randint(0, 64, (4, 17))
    probe = _GradientsAfterStep()
    _train_one_step([batch], accumulate=1, callback=probe, compiled=True,
                    overrides=("trainer.compile_mode=reduce-overhead",))
    assert probe.held == [False]


def test_accumulated_micro_batches_step_like_one_batch() -> None:
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    whole = _train_one_step([batch], accumulate=1)
    halves = _train_one_step([batch[:2], batch[2:]], accumulate=2)
    for (name, a), b in zip(whole.named_parameters(), halves.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def _clipped_steps(fold_into_step: bool, max_norm: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three AdamW steps (fused, on the CPU) on gradients of norm ~60, ~0.06 and ~60; their norms before clipping,
    and the parameters and gradients after the last step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, fused=True)
    norms = []
    for scale in (4.0, 0.004, 4.0):
        for p in params:
            p.grad = scale * torch.randn_like(p)
        norms.append(clip_gradients_(optimizer, params, max_norm, fold_into_step))
        optimizer.step()
    return norms, [t.detach().clone() for p in params for t in (p, p.grad)]


def test_clipping_folded_into_the_fused_step_equals_clipping_before_it() -> None:
    norms_folded, state_folded = _clipped_steps(fold_into_step=True, max_norm=1.0)
    norms_apart, state_apart = _clipped_steps(fold_into_step=False, max_norm=1.0)
    torch.testing.assert_close(norms_folded, norms_apart)
    assert norms_apart[0] > 10 and norms_apart[1] < 1  # one step clipped, one left alone
    for folded, apart in zip(state_folded, state_apart, strict=True):
        torch.testing.assert_close(folded, apart)


def test_clipping_disabled_leaves_the_gradients_unscaled() -> None:
    _, unclipped = _clipped_steps(fold_into_step=True, max_norm=0.0)
    _, clipped = _clipped_steps(fold_into_step=False, max_norm=1.0)
    last_grad_unclipped, last_grad_clipped = unclipped[1], clipped[1]
    assert last_grad_unclipped.norm() > 10 * last_grad_clipped.norm()


def _compiled_and_uncompiled_pairs():
    """(source, target) LitGPTs with unlike weights, one of them compiled, both ways round."""
    for compile_source in (True, False):
        source, target = LitGPT(load_config(TINY, SMALL)), LitGPT(load_config(TINY, SMALL))
        compiled = source if compile_source else target
        compiled.model = torch.compile(compiled.model)  # wraps only: nothing compiles until it is called
        yield source, target


def test_checkpoints_resume_across_compiled_and_uncompiled_models() -> None:
    # trainer.compile is on by default on GPUs and off on CPUs: a run may resume the other kind's checkpoint.
    for source, target in _compiled_and_uncompiled_pairs():
        checkpoint = {"state_dict": source.state_dict()}
        source.on_save_checkpoint(checkpoint)
        assert not any("_orig_mod" in key for key in checkpoint["state_dict"])
        target.on_load_checkpoint(checkpoint)
        target.load_state_dict(checkpoint["state_dict"])  # strict: every name matched
        for a, b in zip(source.parameters(), target.parameters(), strict=True):
            assert a.equal(b)


def test_module_weights_load_under_the_other_compile_setting_as_deepspeed_loads_them() -> None:
    # DeepSpeed's engine saves the module's own names (with `_orig_mod.` when compiled, no on_save_checkpoint) and
    # loads them through load_state_dict: ZeRO-1/2 runs compile by default, and older ones resume.
    for source, target in _compiled_and_uncompiled_pairs():
        target.load_state_dict(source.state_dict())  # strict: every name matched
        for a, b in zip(source.parameters(), target.parameters(), strict=True):
            assert a.equal(b)
