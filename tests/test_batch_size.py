"""trainer.micro_batch_size=auto: candidates that fill the global batch, the search over probed training steps (with
fake steps here: the real one needs CUDA), the CPU rule, resumes, and agreement between ranks."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.multiprocessing import ProcessRaisedException
from torch.utils.data import DataLoader

from pope_lm import batch_size
from pope_lm.batch_size import (
    SameMicroBatchOnEveryRank,
    candidates,
    check_same_micro_batch,
    choose_micro_batch,
    probe_device,
    resolve_micro_batch_size,
)
from pope_lm.checkpointing import checkpoint_state, list_checkpoints
from pope_lm.cli import main
from pope_lm.config import ConfigError, load_config
from pope_lm.data.shards import write_token_dataset
from pope_lm.lit_module import CONFIG_KEY
from pope_lm.strategy import accumulation_steps

GIB = 2**30


class FakeStep:
    """A probe step whose peak is `gib_per_sequence` GiB per sequence, out of memory above `fits_up_to`."""

    def __init__(self, fits_up_to: int, gib_per_sequence: float = 1.0) -> None:
        self.fits_up_to, self.gib_per_sequence = fits_up_to, gib_per_sequence
        self.tried: list[int] = []

    def __call__(self, size: int) -> int:
        self.tried.append(size)
        if size > self.fits_up_to:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return int(size * self.gib_per_sequence * GIB)


def _auto(*overrides: str):
    return load_config("recipes/tiny.yaml", ["trainer.micro_batch_size=auto", *overrides])


def test_candidates_are_the_divisors_of_the_per_rank_batch_largest_first() -> None:
    assert candidates(64, 2) == [32, 16, 8, 4, 2, 1]
    assert candidates(12, 1) == [12, 6, 4, 3, 2, 1]
    with pytest.raises(ConfigError, match=r"'trainer.global_batch_size' \(10\) is not divisible by the world size"):
        candidates(10, 4)


def test_auto_micro_batch_picks_largest_candidate_that_fits() -> None:
    step = FakeStep(fits_up_to=8)
    size, reason = choose_micro_batch(candidates(64, 2), step, total_bytes=80 * GIB)
    assert size == 8 and step.tried == [32, 16, 8]  # stops at the first that fits
    assert reason == "peak 8.0 GiB of 80.0 GiB; 16 ran out of memory"


def test_auto_micro_batch_rejects_a_peak_above_the_headroom() -> None:
    # 16 runs, but at 16 GiB of a 17 GiB card it leaves less than the 10% headroom; 8 (8 GiB) does.
    size, reason = choose_micro_batch([32, 16, 8, 4], FakeStep(fits_up_to=16), total_bytes=17 * GIB)
    assert size == 8
    assert reason == "peak 8.0 GiB of 17.0 GiB; 16 peaked at 16.0 GiB, over 90% of the card"
    assert choose_micro_batch([32, 16, 8], FakeStep(fits_up_to=16), total_bytes=17 * GIB, headroom=0.95)[0] == 16


def test_auto_micro_batch_takes_the_whole_per_rank_batch_when_it_fits() -> None:
    size, reason = choose_micro_batch([4, 2, 1], FakeStep(fits_up_to=64), total_bytes=80 * GIB)
    assert (size, reason) == (4, "peak 4.0 GiB of 80.0 GiB; the largest candidate, global batch / world size")


def test_auto_micro_batch_fails_in_one_line_when_not_even_one_sequence_fits() -> None:
    with pytest.raises(ConfigError) as info:
        choose_micro_batch([2, 1], FakeStep(fits_up_to=0), total_bytes=80 * GIB)
    message = str(info.value)
    assert message.startswith("'trainer.micro_batch_size' auto: no micro-batch fits in 90% of the card's 80.0 GiB "
                              "(1 ran out of memory)") and "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.global_batch_size=64"], 8),  # candidates 64, 32, 16, 8: capped at 8
        (["trainer.global_batch_size=12"], 6),  # 12, 6, ...: the largest not above 8
        (["trainer.global_batch_size=8", "trainer.devices=2", "trainer.strategy=ddp"], 4),  # 8 / 2 ranks
    ],
)
def test_on_cpu_auto_takes_the_largest_candidate_not_above_8_without_probing(overrides, expected, caplog,
                                                                              monkeypatch) -> None:
    monkeypatch.setattr(batch_size, "training_step_probe", None)  # a probe would fail: None is not callable
    caplog.set_level(logging.INFO, logger="pope_lm")
    resolved = resolve_micro_batch_size(_auto(*overrides), "cpu", "32-true")
    assert resolved.trainer.micro_batch_size == expected
    assert accumulation_steps(resolved) * expected * resolved.trainer.devices == resolved.trainer.global_batch_size
    assert caplog.messages == [f"trainer.micro_batch_size=auto -> {expected} (on the CPU nothing is probed: the "
                               f"largest candidate not above 8)"]


def test_on_gpu_auto_probes_this_ranks_card(monkeypatch, caplog) -> None:
    step = FakeStep(fits_up_to=16, gib_per_sequence=2.0)
    devices: list[torch.device] = []

    def probe(cfg, precision: str, device: torch.device) -> FakeStep:
        assert precision == "bf16-mixed" and cfg.data.seq_len == 128
        devices.append(device)
        return step

    monkeypatch.setattr(batch_size, "training_step_probe", probe)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setenv("LOCAL_RANK", "1")
    caplog.set_level(logging.INFO, logger="pope_lm")
    resolved = resolve_micro_batch_size(_auto("trainer.global_batch_size=64"), "gpu", "bf16-mixed")
    assert resolved.trainer.micro_batch_size == 16 and step.tried == [64, 32, 16]
    assert devices == [torch.device("cuda", 1)]
    assert caplog.messages == ["trainer.micro_batch_size=auto -> 16 (peak 32.0 GiB of 80.0 GiB; 32 ran out of memory)"]


@pytest.mark.parametrize(
    ("env", "index"),
    [({}, 0), ({"SLURM_LOCALID": "2"}, 2), ({"LOCAL_RANK": "3", "SLURM_LOCALID": "2"}, 3)],
)
def test_each_rank_probes_the_gpu_of_its_local_rank(env, index, monkeypatch) -> None:
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert probe_device() == torch.device("cuda", index)


@pytest.mark.parametrize(
    ("precision", "dtypes"),
    [("bf16-mixed", (torch.float32, torch.bfloat16)), ("bf16", (torch.float32, torch.bfloat16)),
     ("16-mixed", (torch.float32, torch.float16)), ("bf16-true", (torch.bfloat16, None)),
     ("32-true", (torch.float32, None)), ("transformer-engine", (torch.float32, None))],
)
def test_the_probe_runs_in_the_precision_training_uses(precision, dtypes) -> None:
    assert batch_size._probe_dtypes(precision) == dtypes


def test_a_resumed_run_keeps_its_checkpoints_micro_batch() -> None:
    cfg = _auto("trainer.global_batch_size=64")
    assert resolve_micro_batch_size(cfg, "cpu", "32-true", {"trainer": {"micro_batch_size": 32}}).trainer \
        .micro_batch_size == 32
    # Not a candidate on this world size (64 / 2 ranks = 32 per rank): resolved as for a fresh run.
    two_ranks = _auto("trainer.global_batch_size=64", "trainer.devices=2", "trainer.strategy=ddp")
    assert resolve_micro_batch_size(two_ranks, "cpu", "32-true", {"trainer": {"micro_batch_size": 64}}).trainer \
        .micro_batch_size == 8


def test_an_explicit_micro_batch_is_left_as_it_is() -> None:
    cfg = load_config("recipes/tiny.yaml", ["trainer.micro_batch_size=2"])
    assert resolve_micro_batch_size(cfg, "gpu", "bf16-mixed") is cfg  # no probe: this machine has no GPU


def test_an_unresolved_auto_is_never_used_as_a_number() -> None:
    with pytest.raises(TypeError, match="not resolved to a number yet"):
        accumulation_steps(_auto())


def test_ranks_that_chose_different_micro_batches_get_one_error_naming_each() -> None:
    check_same_micro_batch([16, 16, 16])
    with pytest.raises(ConfigError) as info:
        check_same_micro_batch([16, 8, 16])
    assert str(info.value) == ("'trainer.micro_batch_size' auto chose different micro-batches on the ranks (rank 0: "
                               "16, rank 1: 8, rank 2: 16); set trainer.micro_batch_size=8 (the smallest) explicitly")


class _Scalar(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.weight - batch.mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _PerRank(SameMicroBatchOnEveryRank):
    """As if each rank's probe had chosen sizes[rank]."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__(sizes[0])
        self.sizes = sizes

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.micro_batch_size = self.sizes[trainer.global_rank]
        super().setup(trainer, pl_module, stage)


def _fit_two_ranks(sizes: list[int]) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=1, callbacks=[_PerRank(sizes)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(_Scalar(), train_dataloaders=DataLoader(torch.ones(4, 1), batch_size=1))


def test_ranks_compare_their_micro_batches_once_the_process_group_exists() -> None:
    _fit_two_ranks([4, 4])
    with pytest.raises(ProcessRaisedException, match=r"different micro-batches on the ranks \(rank 0: 4, rank 1: 2\)"):
        _fit_two_ranks([4, 2])


@pytest.mark.slow
def test_auto_resolves_through_pope_lm_train_on_cpu_and_is_logged_as_a_number(tmp_path: Path, caplog) -> None:
    from mlflow import MlflowClient

    rng = np.random.default_rng(0)
    write_token_dataset(tmp_path / "data", {"train": rng.integers(0, 64, 4096), "val": rng.integers(0, 64, 512)},
                        tokenizer="random", vocab_size=64, eos_id=0, block_len=64, shard_tokens=1024)
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="pope_lm")
    assert main(["train", "recipes/tiny.yaml", f"data.dataset={tmp_path / 'data'}", f"run_dir={run_dir}",
                 "model.vocab_size=64", "model.n_layer=1", "model.d_model=32", "model.n_head=1", "model.head_dim=32",
                 "data.seq_len=16", "data.val_batches=1", "trainer.global_batch_size=12",
                 "trainer.micro_batch_size=auto", "trainer.max_steps=2", "trainer.accelerator=cpu"]) == 0
    assert "trainer.micro_batch_size=auto -> 6 (on the CPU nothing is probed" in caplog.text
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pope-lm").experiment_id])
    assert run.data.params["trainer.micro_batch_size"] == "6"
    assert "micro_batch_size: 6" in (run_dir / "config.yaml").read_text()
    checkpoint = list_checkpoints(run_dir / "checkpoints")[-1]
    assert checkpoint_state(checkpoint)[CONFIG_KEY]["trainer"]["micro_batch_size"] == 6
