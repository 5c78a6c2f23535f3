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


@pytest.fixture(scope="session")
def indirect_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of recipes/indirect.yaml shrunk to one tiny layer, trained 2 steps on a tiny indirect dataset
    through `pope-lm train` (its config names data.tokenizer=indirect-char, as the recipe does)."""
    from pope_lm.cli import main
    from pope_lm.data import indirect

    root = tmp_path_factory.mktemp("indirect-run")
    indirect.prepare_indirect(root / "data", sizes={"train": 64, "val": 8, "test": 8}, shard_samples=64)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "indirect.yaml"
    overrides = [f"data.dataset={root / 'data'}", f"run_dir={root / 'run'}", "model.n_layer=1", "model.d_model=32",
                 "model.n_head=2", "model.head_dim=16", "model.attention_backend=reference", "trainer.accelerator=cpu",
                 "trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
                 "trainer.val_every_n_steps=2", "data.val_batches=1", "data.num_workers=0",
                 "checkpoint.every_n_steps=2", "optim.warmup_steps=1", "tracking.enabled=false"]
    assert main(["train", str(recipe), *overrides]) == 0
    return root / "run" / "checkpoints" / "step-00000002.ckpt"
