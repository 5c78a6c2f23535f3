"""Exact resume through Lightning itself: 2 ranks (gloo) x 2 DataLoader workers with gradient accumulation.
A run resumed from a checkpoint taken mid-shard sees, on every rank, exactly the batches that an
uninterrupted run sees after that step; the DataModule state travels in the Lightning checkpoint. With fixed
streams (data.streams), one rank with twice the accumulation makes the same optimizer steps as two, and
continues a two-rank run from its checkpoint (pope-lm's AlignStepsOnResume callback keeps Lightning's steps on
whole global batches when the accumulation changes).

ddp_fork rather than ddp_spawn keeps this fast: spawned ranks start their DataLoader workers with spawn
too, and each of those re-imports the test session (~10 s per worker on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pope_lm.checkpointing import AlignStepsOnResume
from pope_lm.config import DataConfig
from pope_lm.data import TokenDataModule
from pope_lm.data.shards import write_token_dataset

ACCUMULATE = 2


class Recorder(L.LightningModule):
    """Trains one scalar and writes down the first token of every sample it was given, per rank."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.log_dir = log_dir
        self.seen: list[list[int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[:, 0].tolist())
        return (self.weight - batch.float().mean() * 1e-6) ** 2

    def on_train_end(self) -> None:
        (self.log_dir / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dataset: Path, log_dir: Path, max_steps: int, checkpoints: Path, resume: Path | None = None,
        devices: int = 2, accumulate: int = ACCUMULATE, streams: int = 0) -> None:
    log_dir.mkdir()
    cfg = DataConfig(dataset=str(dataset), seq_len=16, num_workers=2, shuffle_buffer=10, val_batches=0,
                     streams=streams)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto", max_steps=max_steps,
        accumulate_grad_batches=accumulate, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        callbacks=[ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=3, save_top_k=-1), AlignStepsOnResume()],
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(Recorder(log_dir), datamodule=TokenDataModule(cfg, micro_batch_size=4, seed=5), ckpt_path=resume)


def write_dataset(directory: Path) -> None:
    write_token_dataset(
        directory, {"train": np.arange(1, 5 * 3000)}, tokenizer="synthetic", vocab_size=1 << 22, eos_id=0,
        block_len=256, shard_tokens=3000,
    )  # fmt: skip


def steps(log_dir: Path, ranks: int, accumulate: int) -> list[list[int]]:
    """The first tokens of every sample in each optimizer step, over all ranks (sorted: the order inside a step does
    not change the step)."""
    seen = [json.loads((log_dir / f"rank{rank}.json").read_text()) for rank in range(ranks)]
    return [sorted(t for rank in seen for batch in rank[s * accumulate:(s + 1) * accumulate] for t in batch)
            for s in range(len(seen[0]) // accumulate)]


def test_lightning_ddp_resume_is_sample_exact(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data")
    fit(tmp_path / "data", tmp_path / "full", max_steps=8, checkpoints=tmp_path / "ckpt")
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    state = torch.load(checkpoint, weights_only=True)["TokenDataModule"]
    assert state["consumed"] == 3 * ACCUMULATE  # micro-batches the loop used, not what the workers prefetched
    fit(tmp_path / "data", tmp_path / "resumed", max_steps=8, checkpoints=tmp_path / "ckpt2", resume=checkpoint)
    for rank in range(2):
        full = json.loads((tmp_path / "full" / f"rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / "resumed" / f"rank{rank}.json").read_text())
        assert len(full) == 8 * ACCUMULATE and resumed == full[3 * ACCUMULATE :]
    first_tokens = [json.loads((tmp_path / "full" / f"rank{r}.json").read_text()) for r in range(2)]
    assert not {t for b in first_tokens[0] for t in b} & {t for b in first_tokens[1] for t in b}  # ranks disjoint


def test_fixed_streams_make_the_same_steps_on_one_rank_as_on_two(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data")
    fit(tmp_path / "data", tmp_path / "two", max_steps=6, checkpoints=tmp_path / "ckpt", streams=4)
    fit(tmp_path / "data", tmp_path / "one", max_steps=6, checkpoints=tmp_path / "ckpt1", devices=1,
        accumulate=2 * ACCUMULATE, streams=4)
    two, one = steps(tmp_path / "two", 2, ACCUMULATE), steps(tmp_path / "one", 1, 2 * ACCUMULATE)
    assert len(two) == 6 and one == two
    # The two-rank checkpoint of step 3, resumed on one rank, continues the same steps.
    fit(tmp_path / "data", tmp_path / "resumed", max_steps=6, checkpoints=tmp_path / "ckpt2", devices=1,
        accumulate=2 * ACCUMULATE, streams=4, resume=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert steps(tmp_path / "resumed", 1, 2 * ACCUMULATE) == two[3:]
