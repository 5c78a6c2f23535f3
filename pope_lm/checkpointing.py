"""Checkpoints: atomic writes, periodic saving with the newest K kept, and `resume=auto` discovery.

A checkpoint file is written under a temporary name and renamed into place, so a file named
`step-XXXXXXXX.ckpt` is always complete; a run killed mid-write leaves only a `.tmp` file, which discovery
ignores and the next save overwrites.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pope_lm.config import ConfigError, RunConfig, config_from_container
from pope_lm.lit_module import CONFIG_KEY
from pope_lm.model import GPT

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})\.ckpt$")


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
    """torch.save to `<path>.tmp`, fsync, then rename over `<path>`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class PeriodicCheckpoint(L.Callback):
    """Save every `every_n_steps` optimizer steps and at the end of training; keep the newest `keep_last`."""

    def __init__(self, directory: Path, every_n_steps: int, keep_last: int) -> None:
        self.directory = directory
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self._last_saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_saved_step:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_saved_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        # Full state (optimizer, schedule, loops, data position), not weights only. Every rank calls; rank 0 writes.
        trainer.save_checkpoint(self.directory / checkpoint_name(step), weights_only=False)
        self._last_saved_step = step
        if trainer.is_global_zero:
            for old in list_checkpoints(self.directory)[: -self.keep_last]:
                old.unlink(missing_ok=True)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, RunConfig]:
    """Rebuild the trained GPT and its RunConfig from a native pope-lm checkpoint (loaded with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if CONFIG_KEY not in state:
        raise ConfigError(f"{path} is not a pope-lm checkpoint (no '{CONFIG_KEY}' entry)")
    cfg = config_from_container(state[CONFIG_KEY])
    model = GPT(cfg.model)
    prefix = "model."
    weights = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in state["state_dict"].items()
               if k.startswith(prefix)}
    model.load_state_dict(weights)
    return model, cfg
