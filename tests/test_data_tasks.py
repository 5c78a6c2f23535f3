"""The paper's small task datasets: indirect indexing (generated problems, one 64-token sample per window),
its preparation and command line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pope_lm.cli import main
from pope_lm.config import DataConfig
from pope_lm.data import TokenDataModule, indirect
from pope_lm.data.shards import member_url, read_blocks, read_manifest
from pope_lm.data.stream import SplitSource

SIZES = {"train": 1000, "val": 100, "test": 100}
SHARD_SAMPLES = 256  # 4 training shards, the last one short: every shard end is exercised
BATCH = 4


def split_tokens(directory: Path, split: str) -> np.ndarray:
    """A split's token stream, read back shard by shard through the checked reader."""
    manifest = read_manifest(str(directory))
    arrays = []
    for shard in manifest.split(split).shards:
        url = member_url(str(directory), shard.name)
        blocks = read_blocks(url, shard, manifest.block_len, np.dtype(manifest.dtype))
        arrays.append(np.concatenate(list(blocks))[: shard.tokens])
    return np.concatenate(arrays)


# ------------------------------------------------------------------------------------------ indirect indexing


def parse(text: str) -> tuple[str, str, int, str]:
    """(string, source letter, shift, target letter) of a problem's text."""
    word, source, rest = text.split(",")
    shift, target = rest.split("=")
    return word, source, int(shift), target


def test_indirect_problems_follow_the_papers_distribution() -> None:
    batch = indirect.problems("train", 5000)
    lengths, source, shift = batch.lengths, batch.source, batch.shift
    assert set(lengths.tolist()) == set(range(20, 41))
    assert ((source >= 0) & (source < lengths)).all()
    assert set(shift.tolist()) == set(range(-15, 16))  # 0 included, as in the paper's range
    assert ((batch.target >= 0) & (batch.target < lengths)).all()
    for i in range(200):
        word, letter, step, target = parse(batch.text(i))
        assert len(set(word)) == len(word) == lengths[i] and set(word) <= set(indirect.LETTERS)
        assert word[word.index(letter) + step] == target


def test_indirect_tokens_spell_the_problem_padded_to_64() -> None:
    batch = indirect.problems("val", 300)
    tokens = indirect.encode_problems(batch)
    assert tokens.shape == (300, 64) and tokens.max() < indirect.VOCAB_SIZE
    for i, row in enumerate(tokens):
        text = batch.text(i)
        assert indirect.decode(row) == text
        n = len(text)
        assert row[:n].tolist() == indirect.encode(text).tolist()
        assert row[n] == indirect.END and (row[n + 1 :] == indirect.PAD).all()
        assert row.tolist().count(indirect.ANSWER) == 1 and row[n - 2] == indirect.ANSWER  # right before the target
        assert indirect.decode(row[n - 1 : n]) == parse(text)[3]
    assert (tokens != indirect.PAD).sum(axis=1).max() <= 49


def test_indirect_problems_are_a_function_of_the_seed_and_independent_of_the_count() -> None:
    first = indirect.encode_problems(indirect.problems("train", 100, seed=0))
    assert np.array_equal(first, indirect.encode_problems(indirect.problems("train", 100, seed=0)))
    longer = indirect.encode_problems(indirect.problems("train", indirect.CHUNK + 10, seed=0))
    assert np.array_equal(longer[:100], first)
    assert not np.array_equal(first, indirect.encode_problems(indirect.problems("train", 100, seed=1)))
    assert not np.array_equal(first, indirect.encode_problems(indirect.problems("val", 100, seed=0)))


@pytest.fixture(scope="module")
def indirect_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("indirect")
    indirect.prepare_indirect(directory, seed=3, sizes=SIZES, shard_samples=SHARD_SAMPLES)
    return directory


def data_module(directory: Path, seq_len: int, **overrides: object) -> TokenDataModule:
    cfg = DataConfig(dataset=str(directory), seq_len=seq_len, **overrides)  # type: ignore[arg-type]
    dm = TokenDataModule(cfg, micro_batch_size=BATCH, seed=0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True)  # type: ignore[assignment]
    dm.setup("fit")
    return dm


def test_the_loader_gives_every_indirect_sample_its_own_window(indirect_dir: Path) -> None:
    manifest = read_manifest(str(indirect_dir))
    assert (manifest.sample_len, manifest.answer_marker, manifest.eos_id) == (64, indirect.ANSWER, indirect.END)
    assert [len(manifest.split(s).shards) for s in SIZES] == [4, 1, 1]
    for split, count in SIZES.items():
        source = SplitSource(str(indirect_dir), tuple(manifest.split(split).shards), manifest.block_len,
                             manifest.dtype, 64)
        assert sum(source.samples_in(s) for s in source.shards) == count == manifest.split(split).documents

    dm = data_module(indirect_dir, 64, val_batches=SIZES["val"] // BATCH)
    expected = {split: indirect.encode_problems(indirect.problems(split, n, seed=3)) for split, n in SIZES.items()}
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        windows = torch.cat(list(loader))
        assert windows.shape == (SIZES[split], 65)
        assert np.array_equal(windows[:, :64].numpy(), expected[split])  # sample i is window i, in order
    train = iter(dm.train_dataloader())
    epoch = torch.cat([next(train) for _ in range(SIZES["train"] // BATCH)])[:, :64].numpy()
    assert sorted(map(bytes, epoch.astype(np.uint8))) == sorted(map(bytes, expected["train"]))


def test_the_loader_refuses_a_seq_len_other_than_the_sample_length(indirect_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"set data.seq_len=64"):
        data_module(indirect_dir, 128)


def test_indirect_rerun_is_a_no_op_and_new_settings_rewrite(tmp_path: Path) -> None:
    sizes = {"train": 600, "val": 10, "test": 10}
    first = indirect.prepare_indirect(tmp_path, sizes=sizes, shard_samples=SHARD_SAMPLES)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert indirect.prepare_indirect(tmp_path, sizes=sizes, shard_samples=SHARD_SAMPLES) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    smaller = indirect.prepare_indirect(tmp_path, sizes={**sizes, "train": 300}, shard_samples=SHARD_SAMPLES)
    assert smaller.split("train").documents == 300
    assert sorted(p.name for p in tmp_path.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]
    first_300 = indirect.encode_problems(indirect.problems("train", 600))[:300]  # a prefix of the larger dataset
    assert np.array_equal(split_tokens(tmp_path, "train"), indirect.split_stream(first_300, SHARD_SAMPLES))


# -------------------------------------------------------------------------------------------------- command lines


def test_cli_prepare_indirect_writes_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prepare", "indirect", "--out", str(tmp_path / "ind"), "--train", "300", "--val", "20", "--test", "20"]
    assert main(argv) == 0
    assert main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second
    assert "indirect-char (vocab 68, uint16); train 1 shards, 300 documents, 19,201 tokens; val 1 shards" in first
