"""Shared test setup, and tiny native checkpoints written exactly as `pope-lm train` writes them.

Triton decides between compiling and interpreting when it is first imported, so TRITON_INTERPRET is set
here, before any test module imports it: on this CPU-only machine the kernels then run in the interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable
from pathlib import Path

import pytest


def _write_checkpoint(path: Path, position: str, seq_len: int = 32, steps: int = 3) -> Path:
    """Train a 2-layer GPT-2-vocabulary model for a few steps on random tokens and save a Lightning checkpoint.

    It goes through `lightning.Trainer.save_checkpoint`, so the file holds 'state_dict' with 'model.'-prefixed
    keys and the 'pope_lm_config' entry that `LitGPT.on_save_checkpoint` adds, like a real training run's.
    """
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from pope_lm.config import ModelConfig, RunConfig
    from pope_lm.lit_module import LitGPT

    cfg = RunConfig(name=f"tiny-{position}", run_dir=str(path.parent.parent))
    cfg.model = ModelConfig(n_layer=2, d_model=32, n_head=4, head_dim=8, position=position,
                            delta_init="uniform", attention_backend="reference")
    cfg.data.seq_len = seq_len
    cfg.optim.warmup_steps = 1
    cfg.trainer.max_steps = steps
    cfg.tracking.enabled = False
    torch.manual_seed(0)
    blocks = torch.randint(0, cfg.model.vocab_size, (8, seq_len + 1))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LitGPT(cfg), train_dataloaders=DataLoader(blocks, batch_size=4))
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: position ('pope' | 'rope' | 'none') -> path of a tiny trained checkpoint, built once per session."""
    made: dict[str, Path] = {}

    def make(position: str = "pope") -> Path:
        if position not in made:
            root = tmp_path_factory.mktemp(f"run-{position}")
            made[position] = _write_checkpoint(root / "checkpoints" / "step-00000003.ckpt", position)
        return made[position]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_tiny_checkpoint: Callable[[str], Path]) -> Path:
    """A tiny PoPE checkpoint (GPT-2 vocabulary, trained at 32 tokens)."""
    return make_tiny_checkpoint("pope")
