"""Checkpoints: atomic writes, periodic saving with the newest K kept, and `resume=auto` discovery.

A checkpoint file is written under a temporary name and renamed into place, so a file named
`step-XXXXXXXX.ckpt` is always complete; a run killed mid-write leaves only a `.tmp` file, which discovery
ignores and the next save overwrites. Under DeepSpeed a checkpoint is a directory of the same name holding
every rank's ZeRO shards (written by all ranks under the temporary name, renamed by rank 0 once all are done);
discovery, resume and `load_model` take either form.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning_utilities.core.apply_func import apply_to_collection

from pope_lm.config import ConfigError, RunConfig, config_from_container
from pope_lm.lit_module import CONFIG_KEY, uncompiled_name
from pope_lm.model import GPT

log = logging.getLogger("pope_lm")

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})\.ckpt$")
BEST_CHECKPOINT = "best.ckpt"  # checkpoint.keep_best: never picked by resume=auto, never pruned by keep_last


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """Map the `resume` setting to a checkpoint path: '' -> None, 'auto' -> newest complete one (or None)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"resume checkpoint not found: {path}")
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<path>.tmp`, fsync, then rename over `<path>`; with `background`, in a writer thread.

    In the background the training loop waits only for a snapshot of the state in host memory, and the writer does the
    rest while training goes on, one checkpoint at a time. At 124M (1.5 GB of state) the snapshot took the loop 0.06 s
    a save (0.7 s the first time, which allocates its page-locked memory) where writing the file took it 1.1 s, on an
    H200 machine (benchmarks/train_throughput_results.md, session 36). The snapshot holds one full state in host memory
    until its file is written. A write that fails stops the run at the next optimizer step (`check`), at the next
    save, or when training ends (`teardown`, which also waits for the last write), with the error and the file.
    """

    def __init__(self, background: bool = True) -> None:
        super().__init__()
        self.background = background
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future[None]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        if not self.background:
            _write_atomically(checkpoint, path)
            return
        self.check()
        self._queue(_write_atomically, _host_snapshot(checkpoint), path)

    def then(self, action: Callable[[], None]) -> None:
        """Run `action` once the checkpoints saved so far are written (in the foreground: now)."""
        if self.background:
            self._queue(action)
        else:
            action()

    def _queue(self, work: Callable[..., None], *args: Any) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pope_lm-checkpoint")
        self._writes.append(self._writer.submit(work, *args))

    def check(self) -> None:
        """Raise the error of a background write (or action) that failed; forget those that succeeded."""
        # one look at each write: one that finished between two looks would be in neither list, its error lost
        finished = {write: write.done() for write in self._writes}
        self._writes = [write for write, done in finished.items() if not done]
        for write, done in finished.items():
            if done:
                write.result()

    def teardown(self) -> None:
        """Wait for the writes still in flight, then raise the first error among them."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self.check()


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written (disk full, permissions): the run stops rather than go on unsaved."""


def _write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise CheckpointWriteError(f"could not write checkpoint {path}: {error}") from error
    log.info("checkpoint %s written", path)


def _host_snapshot(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A copy of the checkpoint that training cannot change any more: every tensor copied to host memory (the
    optimizer updates parameters and its states in place, on the CPU too), everything else deep-copied. A tensor
    referenced twice (tied weights) is copied once and stays shared.

    A GPU tensor goes to page-locked memory, all of them queued at once and waited for together: torch keeps the
    page-locked blocks once freed and hands them to the next snapshot."""
    copies: dict[int, torch.Tensor] = {}

    def host_copy(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            if tensor.is_cuda:
                pinned = torch.empty_like(tensor, device="cpu", pin_memory=True)
                copies[id(tensor)] = pinned.copy_(tensor.detach(), non_blocking=True)
            else:
                copies[id(tensor)] = tensor.detach().clone()
        return copies[id(tensor)]

    apply_to_collection(checkpoint, torch.Tensor, host_copy)
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the copies queued behind the training's work
    # deepcopy takes an object found in its memo as already copied: the tensors become their host copies
    return copy.deepcopy(checkpoint, memo=dict(copies))


class PeriodicCheckpoint(L.Callback):
    """Save every `every_n_steps` optimizer steps and at the end of training; keep the newest `keep_last`.

    With `keep_best`, also keep `best.ckpt`, rewritten whenever a validation ends with a lower val/loss than any
    before (the best value and its step travel in the checkpoints, so a resumed run keeps comparing to it).
    """

    def __init__(self, directory: Path, every_n_steps: int, keep_last: int, keep_best: bool = False) -> None:
        self.directory = directory
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_loss, self.best_step = math.inf, -1
        self._last_saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        _checkpoint_io(trainer).check()  # a failed background write stops the run here
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_saved_step:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_saved_step:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not self.keep_best or trainer.sanity_checking or loss is None or not float(loss) < self.best_loss:
            return
        self.best_loss, self.best_step = float(loss), trainer.global_step
        _write(trainer, self.directory / BEST_CHECKPOINT)

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_loss, self.best_step = state_dict["best_loss"], state_dict["best_step"]

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        _write(trainer, self.directory / checkpoint_name(step))
        self._last_saved_step = step
        if trainer.is_global_zero:  # the oldest go once the new one is written
            _checkpoint_io(trainer).then(self._prune)

    def _prune(self) -> None:
        for old in list_checkpoints(self.directory)[: -self.keep_last]:
            _remove(old)


class AlignStepsOnResume(L.Callback):
    """Keeps optimizer steps on whole global batches when a run resumes with another gradient accumulation.

    Lightning ends an optimizer step when its count of training micro-batches reaches a multiple of the
    accumulation, and that count is restored from the checkpoint. A run checkpointed on 2 GPUs with 2 micro-batches
    per step and resumed on 1 GPU with 4 (fixed data.streams, docs/data.md) would otherwise end its first step after
    2 micro-batches, wherever 6 % 4 falls; validations (every val_every_n_steps x accumulation micro-batches) would
    drift the same way. The checkpoint records the accumulation; when it differs from this run's, the count is moved
    to global_step x the accumulation: every field of the counters by the same amount, since Lightning's own restart
    logic runs after this hook and works from their differences. Same accumulation (or a checkpoint from before this
    callback): left as Lightning restores it.
    """

    def __init__(self) -> None:
        self.accumulation: int | None = None  # the checkpoint's once restored, then this run's

    def state_dict(self) -> dict[str, Any]:
        return {"accumulation": self.accumulation}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accumulation = state_dict["accumulation"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved, self.accumulation = self.accumulation, trainer.accumulate_grad_batches
        if saved is None or saved == self.accumulation:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress  # one endless epoch: current and total agree
        shift = trainer.global_step * self.accumulation - progress.current.ready
        for counter in (progress.current, progress.total):
            counter.ready += shift
            counter.started += shift
            counter.processed += shift
            counter.completed += shift


def _checkpoint_io(trainer: L.Trainer) -> AtomicCheckpointIO:
    """The run's checkpoint writer; under DeepSpeed (which writes its shards itself, in the training loop) or in a
    trainer built without one, a foreground AtomicCheckpointIO, whose `then` acts at once."""
    io = getattr(trainer.strategy, "checkpoint_io", None)
    if isinstance(io, AtomicCheckpointIO) and not isinstance(trainer.strategy, DeepSpeedStrategy):
        return io
    return AtomicCheckpointIO(background=False)


def _write(trainer: L.Trainer, path: Path) -> None:
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        _save_sharded(trainer, path)
    else:
        # Full state (optimizer, schedule, loops, data position), not weights only. Every rank calls; rank 0 writes.
        trainer.save_checkpoint(path, weights_only=False)


def _save_sharded(trainer: L.Trainer, path: Path) -> None:
    """DeepSpeed's directory of per-rank shards, visible under its final name only once every rank has written."""
    tmp = path.with_name(path.name + ".tmp")
    if trainer.is_global_zero:
        _remove(tmp)  # left by a run killed mid-save; its shards may come from another world size
    trainer.strategy.barrier("pope_lm.save_sharded")
    trainer.save_checkpoint(tmp, weights_only=False)  # every rank writes its shards; returns after a barrier
    if trainer.is_global_zero:
        # Saving a step again (the final step right after resuming at it): rename() cannot replace a directory,
        # so the old one moves aside first; a crash in between leaves the complete new one as .tmp and the old as .old.
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _remove(old)
    trainer.strategy.barrier("pope_lm.save_sharded")  # on every rank, the checkpoint is complete once this returns


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's entries besides the weights (config, MLflow run id, loop state), memory-mapped.

    A native file holds everything. In a ZeRO directory they are DeepSpeed's 'client state', stored with rank
    0's model states (whose weights may be placeholders: `load_model` gathers the real ones).
    """
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not (path / "latest").is_file():
        raise ConfigError(f"{path} is not a checkpoint: neither a file nor a DeepSpeed checkpoint directory")
    tag = (path / "latest").read_text().strip()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):  # ZeRO-1/2, ZeRO-3
        if (path / tag / name).is_file():
            return torch.load(path / tag / name, map_location="cpu", weights_only=True, mmap=True)
    raise ConfigError(f"{path} is not a DeepSpeed checkpoint (no model states under {path / tag})")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, RunConfig]:
    """Rebuild the trained GPT and its RunConfig from a pope-lm checkpoint: a native file (loaded with weights_only)
    or a ZeRO directory, whose shards DeepSpeed's zero_to_fp32 gathers into full fp32 weights."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    state = checkpoint_state(path)
    if CONFIG_KEY not in state:
        raise ConfigError(f"{path} is not a pope-lm checkpoint (no '{CONFIG_KEY}' entry)")
    cfg = config_from_container(state[CONFIG_KEY])
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # slow import: only here

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path))
    else:
        state_dict = state["state_dict"]
    model = GPT(cfg.model)
    prefix = "model."
    weights = {uncompiled_name(k[len(prefix):]): v.to(map_location) for k, v in state_dict.items()
               if k.startswith(prefix)}
    model.load_state_dict(weights)
    return model, cfg
