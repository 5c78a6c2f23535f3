"""The streaming DataModule: shard layout over ranks and workers, equal batch counts, exact resume,
layout changes, fixed streams (the same batches on any number of ranks), corrupt shards and remote locations.

The synthetic dataset stores token t at stream position t - 1 (int32 ids), so every sample tells which shard
and which window it came from. Ranks are simulated by attaching a minimal trainer (global_rank, world_size,
training), which is all the DataModule reads from a Lightning trainer.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pope_lm.config import ConfigError, DataConfig
from pope_lm.data import DataError, TokenDataModule
from pope_lm.data.shards import write_token_dataset

SHARD = 3000  # tokens per shard
SEQ = 16
BATCH = 4
TRAIN_TOKENS = 4 * SHARD + 1700  # 5 shards (an odd number), the last one short
SPLIT_OFFSET = {"train": 0, "val": 10**6, "test": 2 * 10**6}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    lengths = {"train": TRAIN_TOKENS, "val": 2 * SHARD + 1000, "test": 2 * SHARD + 500}
    streams = {split: np.arange(1, n + 1) + SPLIT_OFFSET[split] for split, n in lengths.items()}
    write_token_dataset(
        directory, streams, tokenizer="synthetic", vocab_size=1 << 22, eos_id=0, block_len=256, shard_tokens=SHARD
    )
    return directory


def module(location: Path | str, rank: int = 0, world: int = 1, **overrides: object) -> TokenDataModule:
    cfg = DataConfig(**{"dataset": str(location), "seq_len": SEQ, "shuffle_buffer": 10, "val_batches": 5, **overrides})
    dm = TokenDataModule(cfg, micro_batch_size=BATCH, seed=1234)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, training=True)  # type: ignore[assignment]
    dm.setup("fit")
    return dm


def take(dm: TokenDataModule, batches: int) -> list[torch.Tensor]:
    """Consume batches as the training loop does (the count advances in on_after_batch_transfer)."""
    out, error = [], None
    iterator = iter(dm.train_dataloader())
    try:
        for _ in range(batches):
            out.append(dm.on_after_batch_transfer(next(iterator), 0))
    except DataError as exc:
        # Keep only the message and drop the traceback: it holds the DataLoader iterator in a reference
        # cycle, and a worker pool freed by the cycle collector takes 5 s per worker to stop (torch quirk).
        error, exc.__traceback__ = str(exc), None
    del iterator
    if error is not None:
        raise DataError(error)
    return out


def origin(sample: torch.Tensor, split: str = "train") -> tuple[int, int]:
    """(shard, window) a sample came from; also checks it is seq_len + 1 consecutive tokens on the grid."""
    position = int(sample[0]) - 1 - SPLIT_OFFSET[split]
    assert sample.tolist() == list(range(int(sample[0]), int(sample[0]) + SEQ + 1))
    shard, offset = divmod(position, SHARD)
    assert offset % SEQ == 0
    return shard, offset // SEQ


WINDOWS_PER_SHARD = [(SHARD - 1) // SEQ] * 4 + [(1700 - 1) // SEQ]


def test_an_epoch_visits_every_window_once(dataset: Path) -> None:
    batches = take(module(dataset), sum(WINDOWS_PER_SHARD) // BATCH)
    assert all(b.shape == (BATCH, SEQ + 1) and b.dtype == torch.int64 for b in batches)
    seen = [origin(s) for b in batches for s in b]
    assert len(set(seen)) == len(seen) == sum(WINDOWS_PER_SHARD) // BATCH * BATCH
    assert [o for o in seen[:10]] != sorted(seen[:10])  # shuffled


def test_shuffle_buffer_zero_keeps_shard_order(dataset: Path) -> None:
    seen = [origin(s) for b in take(module(dataset, shuffle_buffer=0), 20) for s in b]
    shard = seen[0][0]
    assert seen == [(shard, window) for window in range(len(seen))]


def test_ranks_and_workers_read_disjoint_shards(dataset: Path) -> None:
    """2 ranks x 2 workers = 4 slots on 5 shards: within an epoch each shard belongs to exactly one slot."""
    shards_by_slot = {}
    for rank in range(2):
        batches = take(module(dataset, rank, 2, num_workers=2), 40)  # 80 samples per slot: inside its first shard
        for role in range(2):
            shards_by_slot[rank, role] = {origin(s)[0] for b in batches[role::2] for s in b}
    assert all(len(shards) == 1 for shards in shards_by_slot.values())
    assert len(set.union(*shards_by_slot.values())) == 4


def test_every_rank_yields_the_same_number_of_batches(dataset: Path) -> None:
    per_rank_val, per_rank_test = [], []
    for rank in range(2):
        dm = module(dataset, rank, 2)
        per_rank_val.append(list(dm.val_dataloader()))
        per_rank_test.append(list(dm.test_dataloader()))
        assert len(take(dm, 3 * sum(WINDOWS_PER_SHARD) // (2 * BATCH))) > 0  # three epochs, never runs dry
    assert [len(v) for v in per_rank_val] == [5, 5]
    test_windows = (2 * SHARD - 2) // SEQ + (500 - 1) // SEQ  # 3 test shards, an odd number
    assert [len(t) for t in per_rank_test] == [test_windows // BATCH // 2] * 2
    test_samples = [origin(s, "test") for batches in per_rank_test for b in batches for s in b]
    assert len(set(test_samples)) == len(test_samples)  # the ranks split the test set, in order, disjointly
    assert origin(per_rank_val[0][0][0], "val") == (0, 0) and origin(per_rank_val[1][0][0], "val") == (0, BATCH)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_on_every_rank_and_worker(dataset: Path, num_workers: int) -> None:
    """Interrupted after 13 micro-batches (mid-shard, mid-chunk, mid-worker-cycle) and resumed, each rank
    sees exactly the batches of an uninterrupted run."""
    for rank in range(2):
        uninterrupted = take(module(dataset, rank, 2, num_workers=num_workers), 30)
        first = module(dataset, rank, 2, num_workers=num_workers)
        head = take(first, 13)
        second = module(dataset, rank, 2, num_workers=num_workers)
        second.load_state_dict(first.state_dict())
        middle = take(second, 9)
        third = module(dataset, rank, 2, num_workers=num_workers)
        third.load_state_dict(second.state_dict())
        tail = take(third, 8)
        assert all(a.equal(b) for a, b in zip(head + middle + tail, uninterrupted, strict=True))


def test_prefetched_batches_do_not_count_as_consumed(dataset: Path) -> None:
    dm = module(dataset, num_workers=2)
    iterator = iter(dm.train_dataloader())
    next(iterator)  # the workers have prefetched several more batches by now
    dm.trainer.training = False  # e.g. a validation pass: its batches are not training batches
    dm.on_after_batch_transfer(next(iterator), 0)
    assert dm.state_dict()["consumed"] == 0


def test_layout_change_is_refused_or_restarts_at_the_next_epoch(dataset: Path) -> None:
    old = module(dataset, num_workers=2)
    take(old, 7)
    state = old.state_dict()
    with pytest.raises(DataError, match=r"laid out for 1 rank\(s\) x 2 worker\(s\).*data\.layout_change=next_epoch"):
        module(dataset, 0, 2, num_workers=2).load_state_dict(state)
    streams = []
    for _ in range(2):
        new = module(dataset, 0, 2, num_workers=2, layout_change="next_epoch")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            new.load_state_dict(state)
        assert any("start of the next epoch" in str(w.message) for w in caught)
        streams.append(take(new, 4))
    assert all(a.equal(b) for a, b in zip(*streams, strict=True))  # deterministic
    fresh = take(module(dataset, 0, 2, num_workers=2), 4)
    assert not all(a.equal(b) for a, b in zip(streams[0], fresh, strict=True))


def global_order(dataset: Path, world: int, workers: int, batches: int, **overrides: object) -> list[torch.Tensor]:
    """The first `batches` training micro-batches over all ranks in the order an optimizer step takes them:
    micro-batch u is rank u % world's batch u // world."""
    per_rank = [take(module(dataset, rank, world, num_workers=workers, streams=4, **overrides), batches // world)
                for rank in range(world)]
    return [per_rank[u % world][u // world] for u in range(batches)]


def test_fixed_streams_give_the_same_batches_on_any_ranks_and_workers(dataset: Path) -> None:
    reference = global_order(dataset, 1, 0, 24)
    assert len({origin(b[0])[0] for b in reference[:4]}) == 4  # four streams, four shards, taken in turn
    for world, workers in [(1, 2), (2, 1), (2, 2), (4, 1)]:
        batches = global_order(dataset, world, workers, 24)
        assert all(a.equal(b) for a, b in zip(batches, reference, strict=True)), (world, workers)


def test_fixed_streams_resume_on_another_number_of_ranks(dataset: Path) -> None:
    reference = global_order(dataset, 1, 0, 24)
    two_ranks = [module(dataset, rank, 2, streams=4) for rank in range(2)]
    heads = [take(dm, 5) for dm in two_ranks]  # 10 micro-batches in all
    state = two_ranks[0].state_dict()
    one_rank = module(dataset, 0, 1, num_workers=2, streams=4)
    one_rank.load_state_dict(state)
    continued = [heads[u % 2][u // 2] for u in range(10)] + take(one_rank, 14)
    assert all(a.equal(b) for a, b in zip(continued, reference, strict=True))
    # 10 micro-batches cannot be shared out over 4 ranks (a checkpoint inside an optimizer step): a layout change.
    with pytest.raises(DataError, match=r"laid out for 2 rank\(s\) x 1 worker\(s\).*4 streams"):
        module(dataset, 0, 4, streams=4).load_state_dict(state)


def test_streams_must_be_a_multiple_of_ranks_times_workers(dataset: Path) -> None:
    with pytest.raises(ConfigError, match=r"'data.streams' \(4\) must be a multiple of ranks x workers \(3 x 1 = 3\)"):
        take(module(dataset, 0, 3, streams=4), 1)


def test_resume_on_other_data_is_refused(dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_token_dataset(other, {"train": np.arange(1, 5000)}, tokenizer="synthetic", vocab_size=1 << 22, eos_id=0)
    state = module(dataset).state_dict()
    with pytest.raises(DataError, match="trained on other data"):
        module(other).load_state_dict(state)


def corrupt_copy(dataset: Path, destination: Path, damage: str) -> Path:
    destination.mkdir()
    for path in dataset.iterdir():
        data = path.read_bytes()
        if path.name == "train-000002.tar":
            data = data[: len(data) // 2] if damage == "truncate" else data[:5000] + b"\x01" + data[5001:]
        (destination / path.name).write_bytes(data)
    return destination


@pytest.mark.parametrize(("damage", "message"), [("truncate", "unexpected end of data"), ("flip", "sha256 differs")])
def test_a_corrupt_shard_stops_the_stream_naming_it(dataset: Path, tmp_path: Path, damage: str, message: str) -> None:
    broken = corrupt_copy(dataset, tmp_path / "broken", damage)
    for num_workers in (0, 2):
        with pytest.raises(DataError, match=f"corrupt shard .*train-000002.tar: {message}") as error:
            take(module(broken, num_workers=num_workers), 2 * sum(WINDOWS_PER_SHARD) // BATCH)
        assert "\n" not in str(error.value)  # also when raised in a DataLoader worker


def test_skip_corrupt_skips_and_counts_the_shard(dataset: Path, tmp_path: Path) -> None:
    broken = corrupt_copy(dataset, tmp_path / "broken", "truncate")
    dm = module(broken, skip_corrupt=True)
    with pytest.warns(UserWarning, match="skipping the rest of a shard.*train-000002.tar"):
        batches = take(dm, sum(WINDOWS_PER_SHARD) // BATCH)
    assert dm.skipped_shards == 1
    assert {origin(s)[0] for b in batches for s in b} == {0, 1, 2, 3, 4}  # the readable part of shard 2 was used


def test_tokenizer_length_and_split_checks(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tokenized with 'synthetic' but data\.tokenizer is 'gpt2'"):
        module(dataset, tokenizer="gpt2")
    with pytest.raises(DataError, match=r"no 'train' shard with more than data\.seq_len=5000 tokens"):
        module(dataset, seq_len=5000).train_dataloader()
    without_val = tmp_path / "train-only"
    write_token_dataset(without_val, {"train": np.arange(1, 500)}, tokenizer="synthetic", vocab_size=1 << 22, eos_id=0)
    with pytest.raises(DataError, match=r"no 'val' shard .*; set data\.val_batches=0"):
        module(without_val).val_dataloader()
    assert list(module(without_val, val_batches=0).val_dataloader()) == []


@pytest.mark.parametrize("form", ["file-url", "pipe-template"])
def test_remote_locations(dataset: Path, form: str) -> None:
    location = dataset.as_uri() if form == "file-url" else f"pipe:cat {dataset}/{{name}}"
    assert all(a.equal(b) for a, b in zip(take(module(location), 5), take(module(dataset), 5), strict=True))
