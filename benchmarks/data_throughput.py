"""Data-pipeline throughput on this CPU machine: the training loader and `pope-lm prepare text`.

Loader: a synthetic GPT-2 token dataset (uint16, 4096-token blocks, 2^23-token shards: what `pope-lm prepare`
writes) on local disk, streamed as training streams it: `TokenDataModule(...).train_dataloader()` at seq 1024,
micro-batch 32, the default shuffle. Reported in training tokens/s (batch x seq_len per batch) per process,
for num_workers=0 (the main process alone) and, for reference, num_workers=2. To show where the time goes it
also times each layer below on its own: reading the shard files, sha256 over their bytes, `read_blocks` (tar
parsing, per-block np.load, checksum), the TrainStream without a DataLoader, and a DataLoader that only moves
constant batches between processes. The dataset is written once, then reused; a read pass before timing puts
it in the page cache, so every loader number is warm-cache.

Prepare: real English text (the Shakespeare plays of the built-in corpus, decoded back from its cached
tokens and written --copies times as one file per play) through `pope-lm prepare text` with --workers 1 and
2, in MB of input text (10^6 bytes) per second per worker process, against tiktoken's GPT-2 encoding alone
(`encode_ordinary` per document, as `GPT2Tokenizer.encode` calls it) on the same text in one process.
Reading + splitting and shard writing are also timed alone.

    python benchmarks/data_throughput.py --out results.json

Targets (the data-layer issue): one loader process >= 10M tokens/s (20x the ~0.5M tokens/s one H100 trains the
124M model at); prepare bound by the tokenizer (most of its time inside tiktoken).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

# Only numpy and light parts of pope_lm.data at module level: prepare's worker processes start with `spawn`
# and re-import this module, and should pay no more at start-up than under `pope-lm prepare`, whose main
# module imports neither torch, Lightning, nor pope_lm.data.corpora (importing it builds the GPT-2 tokenizer).
from pope_lm.data.errors import DataError
from pope_lm.data.shards import Manifest, ShardInfo, member_url, read_blocks, read_manifest, write_token_dataset
from pope_lm.data.tokenizers import GPT2Tokenizer, get_tokenizer

LOADER_TARGET = 10e6  # tokens/s from one loader process
H100_124M_TOKENS_PER_S = 0.5e6  # what one H100 consumes training the 124M model (train_throughput_results.md)
MB = 1e6


@dataclass
class Measurement:
    name: str
    unit: str  # "tokens/s" or "MB/s"
    processes: int  # processes doing the work (the per-process rate divides by this)
    values: list[float]  # one rate per repeat
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def best(self) -> float:
        return max(self.values)

    @property
    def per_process(self) -> float:
        return self.median / self.processes

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median, "best": self.best, "per_process": self.per_process}


def environment() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    packages = ("torch", "numpy", "webdataset", "tiktoken", "lightning")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **{name: version(name) for name in packages},
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
    }


@dataclass
class Case:
    name: str
    unit: str
    processes: int
    work: Callable[[], tuple[float, float]]  # runs once; returns (amount of tokens or MB, seconds)
    note: str = ""


def run_interleaved(part: str, cases: list[Case], repeats: int) -> list[Measurement]:
    """Each case once per round, for `repeats` rounds. On a shared machine the load from other processes then
    falls on all cases alike, not on whichever ran during a busy spell; the load average goes to stderr."""
    values: dict[str, list[float]] = {case.name: [] for case in cases}
    for round_ in range(1, repeats + 1):
        for case in cases:
            amount, seconds = case.work()
            values[case.name].append(amount / seconds)
            print(f"{part} round {round_}: {case.name}: {amount / seconds:,.1f} {case.unit} "
                  f"(load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
    return [Measurement(case.name, case.unit, case.processes, values[case.name], case.note) for case in cases]


# ---------------------------------------------------------------------------------------------------- loader


def synthetic_tokens(n: int, seed: int) -> np.ndarray:
    """GPT-2-like token stream: ids with a Zipf-like (1/rank) frequency, documents of ~1000 tokens (geometric
    lengths, as web text) separated by <|endoftext|>. The loader never looks at values; this only keeps the
    dataset honest to inspect."""
    rng = np.random.default_rng(seed)
    ids = (np.power(float(GPT2Tokenizer.eos_id), rng.random(n)) - 1).astype(np.uint16)  # log-uniform over ranks
    ends = np.cumsum(rng.geometric(1 / 1000, size=2 * (n // 1000) + 1))  # twice the expected need
    ids[ends[ends < n]] = GPT2Tokenizer.eos_id
    return ids


def ensure_token_dataset(directory: Path, tokens: int, shard_tokens: int, seed: int) -> Manifest:
    """The synthetic dataset, written unless `directory` already holds one made with the same settings."""
    source = {"kind": "synthetic-benchmark", "tokens": tokens, "shard_tokens": shard_tokens, "seed": seed}
    with contextlib.suppress(DataError):  # absent or unreadable: write it anew
        manifest = read_manifest(str(directory))
        if manifest.source == source:
            return manifest
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    manifest = write_token_dataset(
        directory,
        {"train": synthetic_tokens(tokens, seed)},
        tokenizer="gpt2",
        vocab_size=GPT2Tokenizer.vocab_size,
        eos_id=GPT2Tokenizer.eos_id,
        block_len=4096,  # pope-lm prepare's default
        shard_tokens=shard_tokens,
        source=source,
    )
    print(f"wrote {tokens:,} tokens to {directory} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return manifest


def read_files(paths: list[Path], consume: Callable[[bytes], object] = len) -> tuple[float, float]:
    """Bytes of `paths` read in 1 MiB chunks (each handed to `consume`), and the seconds it took."""
    start, total = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                consume(chunk)
                total += len(chunk)
    return total, time.perf_counter() - start


def read_all_blocks(directory: Path, manifest: Manifest) -> tuple[float, float]:
    """Tokens of every train shard through `read_blocks` (tar parsing, np.load per block, sha256 check)."""
    start, total = time.perf_counter(), 0
    for shard in manifest.splits["train"].shards:
        for block in read_blocks(member_url(str(directory), shard.name), shard, manifest.block_len,
                                 np.dtype(manifest.dtype)):
            total += block.size
    return total, time.perf_counter() - start


def time_batches(batches: Iterator[Any], warmup: int, count: int) -> tuple[float, float]:
    """Training tokens (rows x seq_len; a row's extra token is the last target) of `count` batches after
    `warmup` batches (worker start-up, first shard open), and the seconds they took."""
    for _ in range(warmup):
        next(batches)
    start, tokens = time.perf_counter(), 0
    for _ in range(count):
        batch = next(batches)
        tokens += batch.shape[0] * (batch.shape[1] - 1)
    return tokens, time.perf_counter() - start


def loader_rate(directory: Path, workers: int, shuffle_buffer: int | None, warmup: int, count: int,
                through_dataloader: bool = True, streams: int = 0) -> tuple[float, float]:
    """The training stream of a fresh TokenDataModule at seq 1024, micro-batch 32, timed by `time_batches`;
    through its DataLoader, or the TrainStream iterated directly in this process."""
    from pope_lm.config import DataConfig
    from pope_lm.data import TokenDataModule

    shuffle = {} if shuffle_buffer is None else {"shuffle_buffer": shuffle_buffer}  # None: the default
    cfg = DataConfig(dataset=str(directory), seq_len=1024, num_workers=workers, streams=streams, **shuffle)
    datamodule = TokenDataModule(cfg, micro_batch_size=32, seed=0)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = iter(loader if through_dataloader else loader.dataset)
    try:
        return time_batches(batches, warmup, count)
    finally:
        # Stop the workers and close the shard generators now, not at interpreter exit.
        del batches


def ipc_rate(workers: int, warmup: int, count: int) -> tuple[float, float]:
    """A DataLoader whose workers yield one constant (32, 1025) int64 batch: the cost of moving batches from
    worker processes to the main process alone (shared-memory tensor, queue, unpickling)."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    # Defined here because torch is imported lazily (see the module imports); DataLoader workers start with
    # fork on Linux and need not pickle it.
    class Constant(IterableDataset):
        def __iter__(self) -> Iterator[torch.Tensor]:
            batch = torch.zeros(32, 1025, dtype=torch.int64)
            while True:
                yield batch

    batches = iter(DataLoader(Constant(), batch_size=None, num_workers=workers))
    try:
        return time_batches(batches, warmup, count)
    finally:
        del batches


def per_block_costs(directory: Path, manifest: Manifest, repeats: int = 2000) -> dict[str, float]:
    """Microseconds per 4096-token block for the pieces of `read_blocks`: np.load of one block's bytes and
    sha256 of one block's share of the tar (its 512-byte header + .npy file)."""
    shard = manifest.splits["train"].shards[0]
    block = next(read_blocks(member_url(str(directory), shard.name), shard, manifest.block_len,
                             np.dtype(manifest.dtype)))
    buffer = io.BytesIO()
    np.save(buffer, block, allow_pickle=False)
    npy = buffer.getvalue()
    start = time.perf_counter()
    for _ in range(repeats):
        np.load(io.BytesIO(npy), allow_pickle=False)
    load_us = (time.perf_counter() - start) / repeats * 1e6
    member = shard.bytes / shard.blocks  # tar bytes per block, headers and padding included
    data = b"\0" * 64 * (1 << 20)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    sha_us = (time.perf_counter() - start) / len(data) * member * 1e6
    return {"np_load_us": load_us, "sha256_us": sha_us, "tar_bytes_per_block": member}


def bench_loader(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(args.data_dir)
    manifest = ensure_token_dataset(directory, args.tokens, args.shard_tokens, seed=0)
    shards: list[ShardInfo] = manifest.splits["train"].shards
    paths = [directory / s.name for s in shards]
    read_files(paths)  # into the page cache: all numbers below are warm-cache
    tokens_per_byte = manifest.splits["train"].tokens / sum(s.bytes for s in shards)
    warmup, count, repeats = args.warmup_batches, args.batches, args.repeats

    cases = [
        Case("shard files read (page cache)", "tokens/s", 1,
             lambda: _scaled(read_files(paths), tokens_per_byte), "1 MiB reads of every train shard"),
        Case("sha256 of the shard bytes", "tokens/s", 1,
             lambda: _scaled(read_files(paths, hashlib.sha256().update), tokens_per_byte), "read + hash"),
        Case("read_blocks (tar + np.load + sha256)", "tokens/s", 1,
             lambda: read_all_blocks(directory, manifest), "every train shard, blocks in order"),
        Case("TrainStream, no DataLoader", "tokens/s", 1,
             lambda: loader_rate(directory, 0, None, warmup, count, through_dataloader=False),
             "read_blocks + windows, chunk shuffle, np.stack, int64 cast"),
        Case("train_dataloader, num_workers=0", "tokens/s", 1,
             lambda: loader_rate(directory, 0, None, warmup, count), "the headline: one process"),
        Case("train_dataloader, num_workers=0, data.streams=128", "tokens/s", 1,
             lambda: loader_rate(directory, 0, None, warmup, count, streams=128),
             "the OpenWebText recipes' global order: one process reads 128 streams in turn"),
        Case("train_dataloader, num_workers=0, shuffle_buffer=0", "tokens/s", 1,
             lambda: loader_rate(directory, 0, 0, warmup, count), "shard order: the shuffle's cost"),
        Case("train_dataloader, num_workers=2", "tokens/s", 2,
             lambda: loader_rate(directory, 2, None, warmup, count), "2 workers + the main process on 2 cores"),
        Case("DataLoader moving constant batches, num_workers=2", "tokens/s", 2,
             lambda: ipc_rate(2, warmup, count), "inter-process transfer alone"),
    ]
    measurements = run_interleaved("loader", cases, repeats)
    per_block = per_block_costs(directory, manifest)
    read_blocks_rate = next(m for m in measurements if m.name.startswith("read_blocks")).median
    per_block["read_blocks_us"] = manifest.block_len / read_blocks_rate * 1e6
    # what is left of a block's time: tar header parsing, the member's file object, the generator
    per_block["rest_us"] = per_block["read_blocks_us"] - per_block["np_load_us"] - per_block["sha256_us"]
    return {
        "dataset": {"dir": str(directory), "tokens": manifest.splits["train"].tokens, "shards": len(shards),
                    "block_len": manifest.block_len, "dtype": manifest.dtype,
                    "bytes": sum(s.bytes for s in shards)},
        "settings": {"seq_len": 1024, "micro_batch": 32, "shuffle_buffer": "default (DataConfig)",
                     "warmup_batches": warmup, "batches": count, "repeats": repeats, "page_cache": "warm"},
        "per_block": per_block,
        "measurements": [m.row() for m in measurements],
    }


def _scaled(result: tuple[float, float], factor: float) -> tuple[float, float]:
    amount, seconds = result
    return amount * factor, seconds


# --------------------------------------------------------------------------------------------------- prepare


def shakespeare_texts(cache_dir: str) -> list[str]:
    """The 77 works of the built-in corpus as text: its cached GPT-2 tokens, split at <|endoftext|> and decoded
    (byte-level BPE decodes back to exactly the text that was tokenized)."""
    from pope_lm.data.corpora import ensure_shakespeare

    location = str(ensure_shakespeare(cache_dir))
    manifest = read_manifest(location)
    tokenizer = get_tokenizer(manifest.tokenizer)
    texts = []
    for split in manifest.splits.values():
        stream = np.concatenate([
            np.concatenate(list(read_blocks(member_url(location, s.name), s, manifest.block_len,
                                            np.dtype(manifest.dtype))))[: s.tokens]
            for s in split.shards
        ])
        ends = np.flatnonzero(stream == manifest.eos_id)
        starts = np.concatenate(([0], ends[:-1] + 1))
        texts.extend(tokenizer.decode(stream[a:b]) for a, b in zip(starts, ends, strict=True))
    return texts


def write_corpus(directory: Path, texts: list[str], copies: int) -> list[Path]:
    """`copies` copies of the works, one .txt file per work (prepare text's default: one document per file)."""
    paths = []
    for copy in range(copies):
        (directory / f"copy{copy}").mkdir(parents=True, exist_ok=True)
        for index, text in enumerate(texts):
            path = directory / f"copy{copy}" / f"{index:03d}.txt"
            path.write_text(text, encoding="utf-8")
            paths.append(path)
    return paths


def encode_all(encode: Callable[[str], object], documents: list[str]) -> None:
    """Encode every document, dropping each result at once: keeping millions of Python ints alive would time
    the allocator, not the tokenizer (prepare keeps only the compact uint16 arrays)."""
    for text in documents:
        encode(text)


def timed(work: Callable[[], object]) -> Callable[[], float]:
    """`work` as a function that returns the seconds it took."""

    def run() -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    return run


def prepare_run(corpus: Path, out: Path, workers: int, task_mb: int) -> float:
    """Seconds of `pope-lm prepare text` into a fresh `out`, run in this process (the CLI's main(), without the
    interpreter's start)."""
    from pope_lm.cli import main

    shutil.rmtree(out, ignore_errors=True)  # else prepare sees a matching manifest and does nothing
    command = ["prepare", "text", "--input", str(corpus), "--out", str(out),
               "--workers", str(workers), "--task-mb", str(task_mb)]
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        code = main(command)
        seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"pope-lm {' '.join(command)} failed with exit code {code}")
    return seconds


def bench_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from pope_lm.data.corpora import hash_split

    texts = shakespeare_texts(args.cache_dir)
    tokenizer = get_tokenizer("gpt2")
    # The very tiktoken Encoding that GPT2Tokenizer.encode calls, so "tiktoken alone" is the same tokenizer.
    encoding = tokenizer._encoding  # type: ignore[attr-defined]
    repeats = args.repeats
    with tempfile.TemporaryDirectory(prefix="pope-lm-prepare-bench-") as tmp:
        corpus = Path(tmp, "corpus")
        paths = write_corpus(corpus, texts, args.copies)
        documents = [p.read_text(encoding="utf-8") for p in paths]  # the same text, in memory
        megabytes = sum(p.stat().st_size for p in paths) / MB
        tokens = np.concatenate([tokenizer.encode(text) for text in documents])

        def case(name: str, processes: int, seconds: Callable[[], float], note: str) -> Case:
            return Case(name, "MB/s", processes, lambda: (megabytes, seconds()), note)

        cases = [
            case("tiktoken encode_ordinary alone", 1, timed(lambda: encode_all(encoding.encode_ordinary, documents)),
                 "per document, text in memory"),
            case("GPT2Tokenizer.encode", 1, timed(lambda: encode_all(tokenizer.encode, documents)),
                 "tiktoken + list -> uint16 array"),
            case("read files + hash split", 1,
                 timed(lambda: [hash_split(p.read_bytes().decode("utf-8", errors="replace"), 0.01) for p in paths]),
                 "what prepare does per document besides tokenizing"),
            case("write shards (write_token_dataset)", 1,
                 timed(lambda: write_token_dataset(Path(tmp, "shards"), {"train": tokens}, tokenizer="gpt2",
                                                   vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)),
                 "the pack phase's shard writing (tar, sha256, fsync) of the same tokens"),
            *(
                case(f"pope-lm prepare text --workers {workers}", workers,
                     lambda w=workers: prepare_run(corpus, Path(tmp, "out"), w, args.task_mb),
                     f"--task-mb {args.task_mb}" + ("; in this process" if workers == 1 else "; spawned workers"))
                for workers in (1, 2)
            ),
        ]
        measurements = run_interleaved("prepare", cases, repeats)
        # The same command on one 10 kB file: what a run costs whatever its size (process pools started twice,
        # imports and the tokenizer build in each spawned worker, manifest), to tell it apart from throughput.
        tiny = Path(tmp, "tiny")
        tiny.mkdir()
        (tiny / "000.txt").write_text(texts[0][:10_000], encoding="utf-8")
        fixed = {
            workers: statistics.median(prepare_run(tiny, Path(tmp, "out"), workers, args.task_mb)
                                       for _ in range(repeats))
            for workers in (1, 2)
        }
    by_name = {m.name: m for m in measurements}
    ours, alone = by_name["pope-lm prepare text --workers 1"], by_name["tiktoken encode_ordinary alone"]
    steady = {}
    for workers, seconds in fixed.items():
        total = megabytes / by_name[f"pope-lm prepare text --workers {workers}"].median
        steady[workers] = {"fixed_seconds": seconds, "seconds": total,
                           "per_process_without_fixed": megabytes / (total - seconds) / workers}
    return {
        "corpus": {"works": len(texts), "copies": args.copies, "files": len(paths), "megabytes": megabytes,
                   "tokens": int(tokens.size)},
        "settings": {"task_mb": args.task_mb, "repeats": repeats},
        "measurements": [m.row() for m in measurements],
        # prepare's throughput over tiktoken's = the share of prepare's time spent inside tiktoken
        "prepare_over_tiktoken": {"median": ours.median / alone.median, "best": ours.best / alone.best},
        "steady_state_MB_per_s": steady,
    }


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pope-lm-loader-bench"),
                        help="synthetic token dataset (written once, reused while its settings match)")
    parser.add_argument("--tokens", type=int, default=1 << 27, help="tokens of the synthetic dataset")
    parser.add_argument("--shard-tokens", type=int, default=1 << 23, help="tokens per shard (prepare's default)")
    parser.add_argument("--batches", type=int, default=4096,
                        help="timed loader batches per repeat (256 batches ~ one 2^23-token shard visit)")
    parser.add_argument("--warmup-batches", type=int, default=256, help="untimed batches first (~one shard visit)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every measurement (median reported)")
    parser.add_argument("--cache-dir", default="~/.cache/pope-lm", help="where the built-in corpus is cached")
    parser.add_argument("--copies", type=int, default=4, help="copies of the plays (~9.5 MB each) to prepare")
    parser.add_argument("--task-mb", type=int, default=4, help="prepare --task-mb: enough tasks for 2 workers")
    parser.add_argument("--skip", choices=("loader", "prepare"), default=None)
    args = parser.parse_args()

    results: dict[str, Any] = {"environment": environment()}
    if args.skip != "loader":
        results["loader"] = bench_loader(args)
    if args.skip != "prepare":
        results["prepare"] = bench_prepare(args)
    results["environment"]["load_average_end"] = os.getloadavg()
    results["targets"] = targets(results)

    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def targets(results: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "loader" in results:
        rate = next(m["per_process"] for m in results["loader"]["measurements"]
                    if m["name"] == "train_dataloader, num_workers=0")
        found["loader_tokens_per_s_per_process"] = {
            "value": rate, "target": LOADER_TARGET, "met": rate >= LOADER_TARGET,
            "times_h100_124m": rate / H100_124M_TOKENS_PER_S,
        }
    if "prepare" in results:
        ratio = results["prepare"]["prepare_over_tiktoken"]["median"]
        found["prepare_tokenizer_share"] = {"value": ratio, "target": "> 0.5 (tiktoken is most of the time)",
                                            "met": ratio > 0.5}
    return found


def markdown(results: dict[str, Any]) -> str:
    lines = ["| part | measurement | processes | median | best | per process | note |", "|---|---|---|---|---|---|---|"]
    for part in ("loader", "prepare"):
        for m in results.get(part, {}).get("measurements", []):
            scale, unit = (1e6, "M tokens/s") if m["unit"] == "tokens/s" else (1.0, "MB/s")
            cells = [f"{m[k] / scale:.1f} {unit}" for k in ("median", "best", "per_process")]
            lines.append(f"| {part} | {m['name']} | {m['processes']} | {' | '.join(cells)} | {m['note']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
