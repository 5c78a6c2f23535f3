"""Checkpoint files written in the background: the state as it was at the save, atomically, the oldest pruned only
once a newer one is written, and a failed write that stops the run with the file named (the end-to-end resume:
tests/test_train.py)."""

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pope_lm.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    PeriodicCheckpoint,
    checkpoint_name,
    list_checkpoints,
)


def held_writer(io: AtomicCheckpointIO) -> threading.Event:
    """Keep `io`'s writer busy until the returned event is set: the saves queued meanwhile wait behind it."""
    release = threading.Event()
    io.then(lambda: release.wait(timeout=60) or None)
    return release


def test_a_background_write_keeps_the_state_as_it_was_when_saved(tmp_path: Path) -> None:
    io = AtomicCheckpointIO(background=True)
    weight = torch.zeros(4)
    release = held_writer(io)
    path = tmp_path / checkpoint_name(3)
    io.save_checkpoint({"state_dict": {"wte": weight, "lm_head": weight}, "loops": {"step": [3]}}, path)
    weight.add_(1.0)  # the optimizer's next in-place update, before the file is written
    assert not path.exists()
    release.set()
    io.teardown()  # waits for the write

    saved = torch.load(path, weights_only=True)
    assert torch.equal(saved["state_dict"]["wte"], torch.zeros(4))
    assert saved["state_dict"]["wte"].data_ptr() == saved["state_dict"]["lm_head"].data_ptr()  # tied stays tied
    assert saved["loops"] == {"step": [3]}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_the_oldest_checkpoints_go_only_once_a_newer_one_is_written(tmp_path: Path) -> None:
    io = AtomicCheckpointIO(background=True)
    state = torch.zeros(2)

    def save_checkpoint(path: Path, weights_only: bool) -> None:
        io.save_checkpoint({"state": state}, path)

    trainer = SimpleNamespace(strategy=SimpleNamespace(checkpoint_io=io), is_global_zero=True, global_step=0,
                              save_checkpoint=save_checkpoint)
    periodic = PeriodicCheckpoint(tmp_path, every_n_steps=2, keep_last=2)
    for step in (2, 4):
        trainer.global_step = step
        periodic.save(trainer)  # type: ignore[arg-type]
    io.teardown()
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(2), checkpoint_name(4)]

    release = held_writer(io)
    trainer.global_step = 6
    periodic.save(trainer)  # type: ignore[arg-type]
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(2), checkpoint_name(4)]  # 6 unwritten
    release.set()
    io.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(4), checkpoint_name(6)]


def test_a_failed_background_write_stops_the_run_naming_the_file(tmp_path: Path) -> None:
    blocked = tmp_path / "checkpoints"
    blocked.write_text("a file where the checkpoint directory should be")
    io = AtomicCheckpointIO(background=True)
    path = blocked / checkpoint_name(2)
    io.save_checkpoint({"state": torch.zeros(2)}, path)
    with pytest.raises(CheckpointWriteError, match=f"could not write checkpoint {path}: "):
        io.teardown()


def test_the_next_step_raises_a_failed_write_without_waiting_for_the_end(tmp_path: Path) -> None:
    blocked = tmp_path / "checkpoints"
    blocked.write_text("a file where the checkpoint directory should be")
    io = AtomicCheckpointIO(background=True)
    io.save_checkpoint({"state": torch.zeros(2)}, blocked / checkpoint_name(2))
    written = threading.Event()
    io.then(written.set)
    assert written.wait(timeout=60)  # the write has failed by now
    trainer = SimpleNamespace(strategy=SimpleNamespace(checkpoint_io=io), global_step=3)
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint"):
        PeriodicCheckpoint(blocked, every_n_steps=100, keep_last=1).on_train_batch_end(trainer)  # type: ignore[arg-type]
    io.teardown()  # raised once, not again


def test_in_the_foreground_the_file_is_written_before_save_returns(tmp_path: Path) -> None:
    io = AtomicCheckpointIO(background=False)
    path = tmp_path / checkpoint_name(1)
    io.save_checkpoint({"state": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state"], torch.ones(2))
