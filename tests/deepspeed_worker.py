"""One rank of DeepSpeed ZeRO-2 and ZeRO-3 runs of the pope-lm GPT on CPU, driven directly (Lightning refuses
DeepSpeed on CPU).

    torchrun --nproc_per_node 2 tests/deepspeed_worker.py OUT_DIR

For each stage, builds what `pope-lm train trainer.strategy=deepspeed` builds (LitGPT with its AdamW and schedule,
the DeepSpeed config from `pope_lm.strategy.deepspeed_config`), trains 4 optimizer steps with accumulation and
saves a ZeRO checkpoint after steps 2 and 4 the way Lightning's DeepSpeedStrategy does (tag 'checkpoint', the
pope-lm config in the client state); then a fresh engine resumes from the step-2 checkpoint and repeats steps 3
and 4. Rank 0 writes OUT_DIR/zero{stage}/result.pt: the per-step losses of both runs and the engine's full fp32
weights after step 4, and the initial model's loss on one batch called outside and through the engine. Last, ZeRO-3
runs again into OUT_DIR/zero3-fused-mlp with the MLPs called as on CUDA (below).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import deepspeed_cpu  # noqa: F401
import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param

from pope_lm.checkpointing import checkpoint_name
from pope_lm.config import RunConfig, config_to_container, load_config
from pope_lm.lit_module import CONFIG_KEY, LitGPT
from pope_lm.strategy import (
    accumulation_steps,
    clamp_sharded_phase_biases_,
    deepspeed_config,
    register_zero3_external_parameters,
)

STEPS = 4
OVERRIDES = [
    "model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.head_dim=32", "data.seq_len=16",
    "trainer.strategy=deepspeed", "trainer.devices=2", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
    # A large lr and no warmup push half of PoPE's phase biases (initialised at their bound, 0) out of range at
    # the first step, so the clamp of the sharded fp32 master weights has work to do.
    "optim.lr=0.05", "optim.min_lr=0.0", "optim.warmup_steps=0", "optim.grad_clip=1.0",
]


def batch(cfg: RunConfig, step: int, micro: int, rank: int) -> torch.Tensor:
    """The same tokens for a given (step, micro-batch, rank) in every run, so a resumed run sees what the first saw."""
    generator = torch.Generator().manual_seed(step * 1000 + micro * 10 + rank)
    return torch.randint(0, cfg.model.vocab_size, (cfg.trainer.micro_batch_size, cfg.data.seq_len + 1),
                         generator=generator)


def engine_for(cfg: RunConfig) -> deepspeed.DeepSpeedEngine:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, as Lightning's seed_everything gives
    module = LitGPT(cfg)
    if cfg.trainer.zero_stage == 3:  # as DeepSpeedLitGPT does
        register_zero3_external_parameters(module.model)
    spec = module.configure_optimizers()
    engine, *_ = deepspeed.initialize(model=module, optimizer=spec["optimizer"],
                                      lr_scheduler=spec["lr_scheduler"]["scheduler"],
                                      config=deepspeed_config(cfg, "32-true"))
    return engine


def train(engine: deepspeed.DeepSpeedEngine, cfg: RunConfig, steps: range, save_dir: Path | None) -> list[float]:
    rank, losses = torch.distributed.get_rank(), []
    for step in steps:
        total = 0.0
        for micro in range(accumulation_steps(cfg)):
            tokens = batch(cfg, step, micro, rank)
            logits = engine(tokens[:, :-1])
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
            engine.backward(loss)
            engine.step()
            total += loss.item()
        assert engine.was_step_applied()
        clamp_sharded_phase_biases_(engine.module.model)
        losses.append(total / accumulation_steps(cfg))
        if save_dir is not None and (step + 1) % 2 == 0:
            engine.save_checkpoint(save_dir / checkpoint_name(step + 1), tag="checkpoint",
                                   client_state={CONFIG_KEY: config_to_container(cfg)})
    return losses


def run_stage(stage: int, out: Path) -> None:
    cfg = load_config(Path(__file__).parent.parent / "recipes" / "tiny.yaml",
                      [*OVERRIDES, f"trainer.zero_stage={stage}"])
    engine = engine_for(cfg)
    scores = scored_outside_and_inside_the_engine(engine, cfg)
    losses = train(engine, cfg, range(STEPS), out)
    weights = {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}

    resumed = engine_for(cfg)
    resumed.load_checkpoint(str(out / checkpoint_name(2)))
    resumed_losses = train(resumed, cfg, range(2, STEPS), None)
    if torch.distributed.get_rank() == 0:
        torch.save({"losses": losses, "resumed_losses": resumed_losses, "weights": weights, "scores": scores},
                   out / "result.pt")


def scored_outside_and_inside_the_engine(engine: deepspeed.DeepSpeedEngine, cfg: RunConfig) -> tuple[float, float]:
    """The initial model's loss on one batch, called directly as LitGPT.on_train_start calls it (outside the engine,
    where ZeRO-3 gathers only what it was told of) and through the engine."""
    tokens = batch(cfg, 0, 0, torch.distributed.get_rank())
    with torch.no_grad():
        outside = engine.module.model(tokens[:, :-1], tokens[:, 1:]).item()
        logits = engine(tokens[:, :-1])
        inside = F.cross_entropy(logits.view(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).item()
    return outside, inside


def call_mlps_as_on_cuda() -> None:
    """Route every MLP through `gelu_mlp` as CUDA runs do (on the CPU its op computes the same function in torch). It
    reads the Linears' weights without calling their forward, and ZeRO-3 must gather them all the same."""
    import pope_lm.model

    def forward(self: pope_lm.model.MLP, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fused(x, self.up.weight, self.down.weight))

    pope_lm.model.MLP.forward = forward  # type: ignore[method-assign]


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    for zero_stage in (2, 3):
        run_stage(zero_stage, Path(sys.argv[1]) / f"zero{zero_stage}")
    call_mlps_as_on_cuda()
    run_stage(3, Path(sys.argv[1]) / "zero3-fused-mlp")
    # End the rank without interpreter teardown. Something outside Python's view keeps the four engines alive after
    # run_stage, even through gc.collect() (DeepSpeedEngine.destroy() frees only two), so their gloo process groups
    # and worker threads are still alive after destroy_process_group. Tearing those down while the interpreter
    # finalized aborted rank 1 about once in 30 runs ("terminate called without an active exception", no Python
    # frame: sessions 16, 23 and 24's CI). Everything this rank writes is written by now, and the barrier holds both
    # ranks until then.
    torch.distributed.barrier()
    deepspeed.comm.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
