"""Question/answer datasets (manifest `answer_marker`): only the answer token is scored, accuracy is logged,
and the test split is scored once training ends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pope_lm.config import load_config
from pope_lm.data.shards import write_token_dataset
from pope_lm.lit_module import LitGPT
from tests.test_train import finish, history, mlflow_run, pope_lm

pytestmark = pytest.mark.slow

VOCAB, MARKER, PAD, SAMPLE_LEN = 12, 11, 0, 8


def recall_first_samples(n: int, seed: int) -> np.ndarray:
    """Samples `a b c d e = a` (letters 1..10, padded to SAMPLE_LEN): the answer is the sample's first letter."""
    rng = np.random.default_rng(seed)
    letters = rng.integers(1, 11, size=(n, 5))
    samples = np.full((n, SAMPLE_LEN), PAD, dtype=np.int64)
    samples[:, :5], samples[:, 5], samples[:, 6] = letters, MARKER, letters[:, 0]
    return samples.reshape(-1)


@pytest.fixture(scope="module")
def recall_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recall")
    # One extra pad token per split: a window needs seq_len + 1 tokens, so the last sample gets one too.
    streams = {split: np.append(recall_first_samples(n, seed), PAD)
               for split, n, seed in (("train", 4096, 0), ("val", 64, 1), ("test", 128, 2))}
    write_token_dataset(root, streams, tokenizer="recall-test", vocab_size=VOCAB, eos_id=PAD, block_len=64,
                        sample_len=SAMPLE_LEN, answer_marker=MARKER)
    return root


def test_answer_datasets_score_only_the_token_after_the_marker(tmp_path):
    cfg = load_config("recipes/tiny.yaml", [f"model.vocab_size={VOCAB}", "model.n_layer=1", f"run_dir={tmp_path}"])
    module = LitGPT(cfg)
    module.answer_marker = MARKER
    batch = torch.from_numpy(recall_first_samples(3, seed=5)[: 2 * SAMPLE_LEN + 1]).view(1, -1)
    loss, accuracy = module.score(batch)

    logits = module.model(batch[:, :-1])[0]
    answers = (batch[0, :-1] == MARKER).nonzero().flatten()
    targets = batch[0, answers + 1]
    assert len(answers) == 2
    torch.testing.assert_close(loss, F.cross_entropy(logits[answers].float(), targets))
    assert accuracy == (logits[answers].argmax(-1) == targets).float().mean()


def test_answer_task_learns_and_logs_validation_and_test_accuracy(tmp_path, recall_dataset):
    run_dir = tmp_path / "recall"
    finish(pope_lm("recipes/tiny.yaml", f"data.dataset={recall_dataset}", f"data.seq_len={SAMPLE_LEN}",
                   "data.tokenizer=recall-test", f"model.vocab_size={VOCAB}", "model.n_layer=2", "model.d_model=64",
                   "model.n_head=2", "trainer.global_batch_size=32", "trainer.micro_batch_size=32",
                   "trainer.max_steps=120", "trainer.val_every_n_steps=60", "data.val_batches=2",
                   "optim.warmup_steps=10", run_dir=run_dir))
    client, (run,) = mlflow_run(run_dir)
    val_accuracy = history(client, run.info.run_id, "val/accuracy")
    first, *_, last = sorted(val_accuracy)
    assert len(val_accuracy) == 3 and first == 0
    assert val_accuracy[first] < 0.4 and val_accuracy[last] > 0.9, val_accuracy  # chance is 0.1
    (test_loss,) = history(client, run.info.run_id, "test/loss").values()
    (test_accuracy,) = history(client, run.info.run_id, "test/accuracy").values()
    assert test_accuracy > 0.9 and test_loss < 0.5
    assert history(client, run.info.run_id, "train/accuracy")


def test_keep_best_tests_the_weights_of_the_best_validation(tmp_path, recall_dataset):
    run_dir = tmp_path / "best"
    out = finish(pope_lm("recipes/tiny.yaml", f"data.dataset={recall_dataset}", f"data.seq_len={SAMPLE_LEN}",
                         "data.tokenizer=recall-test", f"model.vocab_size={VOCAB}", "model.n_layer=1",
                         "model.d_model=64", "model.n_head=2", "trainer.global_batch_size=32",
                         "trainer.micro_batch_size=32", "trainer.max_steps=30", "trainer.val_every_n_steps=10",
                         "data.val_batches=2", "optim.warmup_steps=5", "checkpoint.keep_best=true",
                         "checkpoint.every_n_steps=10", "checkpoint.keep_last=1", "trainer.test_on=best",
                         run_dir=run_dir))
    client, (run,) = mlflow_run(run_dir)
    val_losses = [v for step, v in history(client, run.info.run_id, "val/loss").items() if step > 0]
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    (state,) = [s for s in best["callbacks"].values() if "best_loss" in s]
    assert len(val_losses) == 3 and state["best_loss"] == pytest.approx(min(val_losses))
    assert f"(step {best['global_step']}, val/loss" in out
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["test/step"] == best["global_step"] and "test/accuracy" in final
    # keep_last prunes the step checkpoints only; resume=auto would pick step-00000030
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "step-00000030.ckpt"]
