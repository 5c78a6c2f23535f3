"""The paper's small task datasets: indirect indexing (generated problems, one 64-token sample per window)
and the JSB chorales (music21's Bach chorales on a 16th-note grid), their preparation and command lines."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pope_lm.cli import main
from pope_lm.config import DataConfig
from pope_lm.data import TokenDataModule, indirect, jsb
from pope_lm.data.shards import member_url, read_blocks, read_manifest
from pope_lm.data.stream import SplitSource
from pope_lm.data.tokenizers import get_tokenizer

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


# -------------------------------------------------------------------------------------------------- JSB chorales

BWV66_6 = "bwv66.6.mxl"
KEPT = (BWV66_6, "bwv10.7.mxl", "bwv102.7.mxl")
SKIPPED = ("bwv1.6.mxl", "riemenschneider001.rntxt")  # a horn part besides the voices; an analysis


def corpus_paths(names: tuple[str, ...]) -> list[Path]:
    """Files of music21's Bach corpus by name (the JSB tests skip where music21 is not installed)."""
    pytest.importorskip("music21")
    paths = {p.name: p for p in jsb.chorale_files()}
    return [paths[name] for name in names]


@pytest.fixture(scope="module")
def bwv66_6() -> tuple[object, np.ndarray]:
    (path,) = corpus_paths((BWV66_6,))
    grid, reason = jsb.read_chorale(str(path))
    assert grid is not None and reason == ""
    return jsb.require_music21().converter.parse(path, forceSource=True, storePickle=False), grid


def test_jsb_chorales_take_four_tokens_per_16th_step(bwv66_6: tuple[object, np.ndarray]) -> None:
    score, grid = bwv66_6
    tokens = jsb.grid_tokens(grid)
    assert grid.shape == (math.ceil(score.highestTime * 4), 4) == (144, 4)  # 36 quarter notes
    assert tokens.size == 4 * 144 + 1 and tokens[-1] == jsb.END and (tokens[:-1] != jsb.END).all()
    assert tokens.max() < jsb.VOCAB_SIZE == 90


def test_jsb_first_step_of_bwv66_6_is_c_sharp_e_a_a(bwv66_6: tuple[object, np.ndarray]) -> None:
    _, grid = bwv66_6
    assert grid[0].tolist() == [73, 64, 57, 57]  # C#5 E4 A3 A3
    assert jsb.grid_tokens(grid)[:4].tolist() == [73 - 20, 64 - 20, 57 - 20, 57 - 20]


def test_jsb_tokens_round_trip_to_the_pitches_music21_reads(bwv66_6: tuple[object, np.ndarray]) -> None:
    score, grid = bwv66_6
    assert np.array_equal(jsb.tokens_grid(jsb.grid_tokens(grid)), grid)
    for voice, part in enumerate(score.parts):
        for event in part.flatten().notesAndRests:
            first = math.ceil(event.offset * 4)
            if first < math.ceil((event.offset + event.quarterLength) * 4):
                assert grid[first, voice] == (jsb.REST if event.isRest else event.pitch.midi)


def test_jsb_tokenizer_text_of_a_converted_chorale(bwv66_6: tuple[object, np.ndarray]) -> None:
    """What `pope-lm sample` prints for a jsb-16th model: one 16th-note step per line, S A T B note names."""
    _, grid = bwv66_6
    tokens = jsb.grid_tokens(grid)
    tokenizer = get_tokenizer("jsb-16th")
    lines = tokenizer.decode(tokens).split("\n")
    assert lines[0] == "C#5 E4 A3 A3" and lines[-1] == "<end>" and len(lines) == 144 + 1
    assert all(len(line.split()) == 4 for line in lines[:-1])
    assert np.array_equal(tokenizer.encode(tokenizer.decode(tokens)), tokens)


@pytest.fixture(scope="module")
def jsb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("jsb")
    jsb.prepare_jsb(directory, files=corpus_paths(KEPT + SKIPPED), workers=1)
    return directory


def test_jsb_dataset_holds_one_stream_of_whole_chorales_per_split(jsb_dir: Path) -> None:
    manifest = read_manifest(str(jsb_dir))
    assert (manifest.vocab_size, manifest.eos_id, manifest.sample_len, manifest.answer_marker) == (90, 0, None, None)
    splits, skipped = manifest.source["splits"], manifest.source["skipped"]
    assert sorted(n for names in splits.values() for n in names) == sorted(KEPT)
    assert [len(splits[s]) for s in SIZES] == [1, 1, 1]
    assert sorted(skipped) == sorted(SKIPPED) and "Horn 2" in skipped["bwv1.6.mxl"]
    for split, (name,) in splits.items():
        grid, _ = jsb.read_chorale(str(corpus_paths((name,))[0]))
        assert np.array_equal(split_tokens(jsb_dir, split), jsb.grid_tokens(grid))
        assert manifest.split(split).documents == 1


def test_jsb_split_is_a_seeded_permutation_in_the_papers_proportions() -> None:
    names = [f"c{i:03d}" for i in range(365)]
    split = jsb.split_chorales(names, seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [218, 73, 74]
    assert sorted(n for names in split.values() for n in names) == names
    assert split == jsb.split_chorales(list(reversed(names)), seed=0) != jsb.split_chorales(names, seed=1)


# -------------------------------------------------------------------------------------------------- command lines


def test_cli_prepare_indirect_writes_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prepare", "indirect", "--out", str(tmp_path / "ind"), "--train", "300", "--val", "20", "--test", "20"]
    assert main(argv) == 0
    assert main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second
    assert "indirect-char (vocab 68, uint16); train 1 shards, 300 documents, 19,201 tokens; val 1 shards" in first


def test_cli_prepare_jsb_in_worker_processes_matches_one_process(
    jsb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    subset = corpus_paths(KEPT + SKIPPED)
    monkeypatch.setattr(jsb, "chorale_files", lambda: subset)
    assert main(["prepare", "jsb", "--out", str(tmp_path / "jsb"), "--workers", "2"]) == 0
    assert "jsb-16th (vocab 90, uint16); train 1 shards, 1 documents" in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "jsb")).data_id == read_manifest(str(jsb_dir)).data_id


def test_cli_prepare_jsb_without_music21_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "music21", None)  # makes `import music21` raise ImportError
    assert main(["prepare", "jsb", "--out", str(tmp_path / "jsb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and "pip install music21" in err
