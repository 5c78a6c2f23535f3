"""The prepare pipeline shared by every corpus: tokenize in parallel, pack into shards, write the manifest.

Two phases, both restartable:

1. Tokenize. The corpus is cut into tasks (a group of files, a byte range of a JSONL file, a few parquet
   row groups, a stretch of a chromosome...). Worker processes turn each task into one token file per
   split under `<out>/.prepare/parts/`, plus a small record of its fingerprint and counts; a re-run skips
   every task whose record matches.
2. Pack. Each split's parts, concatenated in task order, form one token stream that is cut into shards of
   `shard_tokens` tokens, written in parallel; a re-run skips every shard whose record matches.

The manifest is written last and atomically, then the work directory is removed. A re-run whose inputs
and settings match an existing manifest's fingerprint does nothing.

Output is a pure function of the inputs and settings, independent of the number of worker processes.

Datasets made in memory (the indirect-indexing task, the JSB chorales) skip both phases: `prepare_generated`
writes their token arrays directly and is a no-op when the manifest already records the same settings.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .shards import (
    FORMAT,
    MANIFEST,
    Manifest,
    ShardInfo,
    SplitInfo,
    read_manifest,
    write_manifest,
    write_shard,
    write_token_dataset,
)
from .tokenizers import check_tokenizer_name, get_tokenizer, token_dtype

SPLITS = ("train", "val", "test")
_SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")


class Task(Protocol):
    """One unit of tokenization work; must be picklable (it travels to a worker process)."""

    size: int  # input bytes (or bases), for the progress bar

    def fingerprint(self) -> str:
        """Changes whenever the task's output would change (inputs, their size and mtime, settings)."""
        ...

    def pieces(self) -> Iterator[tuple[str, str, bool]]:
        """(split, text, ends_document) triples. A long document (a chromosome stretch) may come in several
        pieces; the end-of-document id follows the piece that ends it."""
        ...


@dataclass(frozen=True)
class Settings:
    """The prepare settings that shape the output; they enter the dataset fingerprint."""

    tokenizer: str
    block_len: int = 4096
    shard_tokens: int = 1 << 23  # 8.4M tokens: 16 MiB uint16 shards; enough shards for many ranks x workers

    def __post_init__(self) -> None:
        check_tokenizer_name(self.tokenizer)  # unknown names fail here, before any work (and without building it)
        if self.block_len <= 0 or self.shard_tokens < self.block_len or self.shard_tokens % self.block_len:
            raise DataError(
                f"--shard-tokens ({self.shard_tokens}) must be a positive multiple of --block-len ({self.block_len})"
            )


@dataclass(frozen=True)
class _PartResult:
    tokens: dict[str, int]  # per split
    documents: dict[str, int]


def prepare_dataset(
    out_dir: str | Path,
    tasks: Iterable[Task],
    settings: Settings,
    source: dict[str, Any],
    *,
    workers: int = 0,
    total_size: int | None = None,
) -> Manifest:
    """Tokenize `tasks` into a sharded dataset at `out_dir` and return its manifest.

    `source` describes the inputs (paths with sizes and mtimes, options) for the manifest and the
    fingerprint; `workers` <= 1 tokenizes in this process, 0 means one worker per CPU.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _digest({"format": FORMAT, "settings": asdict(settings), "source": source})
    existing = _complete_manifest(out)
    if existing is not None and existing.fingerprint == fingerprint:
        return existing
    (out / MANIFEST).unlink(missing_ok=True)  # never readable as complete while being rewritten
    work = out / ".prepare"
    (work / "parts").mkdir(parents=True, exist_ok=True)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1

    tokenizer = get_tokenizer(settings.tokenizer)
    parts: list[tuple[Path, str, _PartResult]] = []
    with tqdm(total=total_size, unit="B", unit_scale=True, desc="tokenize", disable=None) as bar:
        jobs = (
            (_tokenize_task, (task, settings.tokenizer, work / "parts" / f"{i:06d}")) for i, task in enumerate(tasks)
        )
        for stem, task_fp, result, size in run_jobs(jobs, workers):
            parts.append((stem, task_fp, result))
            bar.update(size)
    splits: dict[str, SplitInfo] = {}
    shard_jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    for split in SPLITS:
        sources = [
            (stem.with_suffix(f".{split}.npy"), fp, r.tokens[split]) for stem, fp, r in parts if r.tokens.get(split)
        ]
        documents = sum(r.documents.get(split, 0) for _, _, r in parts)
        if not sources:
            continue
        splits[split] = SplitInfo(documents=documents)
        total = sum(n for _, _, n in sources)
        for index, start in enumerate(range(0, total, settings.shard_tokens)):
            name = f"{split}-{index:06d}.tar"
            span = (start, min(start + settings.shard_tokens, total))
            shard_jobs.append(
                (_pack_shard, (out / name, work / "shards" / f"{name}.json", sources, span, settings, tokenizer.eos_id))
            )
    if "train" not in splits:
        raise DataError(f"{out}: the inputs produced no training documents")
    with tqdm(total=len(shard_jobs), unit="shard", desc="pack", disable=None) as bar:
        for shard in run_jobs(iter(shard_jobs), workers):
            splits[shard.name.split("-")[0]].shards.append(shard)
            bar.update(1)

    manifest = Manifest(
        tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        dtype=token_dtype(tokenizer.vocab_size).name,
        block_len=settings.block_len,
        splits=splits,
        fingerprint=fingerprint,
        source=source,
    )
    write_manifest(out, manifest)
    _remove_stale_shards(out, manifest)
    shutil.rmtree(work)
    return manifest


def prepare_generated(
    out_dir: str | Path,
    settings: dict[str, Any],
    build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
    **dataset: Any,
) -> Manifest:
    """Write a dataset that is made in memory (a synthetic task, a small parsed corpus) rather than tokenized
    from files, unless the directory already holds one made with the same `settings`.

    Such datasets have no tokenize phase worth resuming, so the comparison is on the settings alone (JSON
    values, recorded at the top of the manifest's `source`): a re-run with the same ones does not call
    `build`. Otherwise `build()` returns the split streams and further details for `source`, and the dataset
    is rewritten with `write_token_dataset(out_dir, streams, source=..., **dataset)`.
    """
    out = Path(out_dir)
    existing = _complete_manifest(out)
    if existing is not None and {key: existing.source.get(key) for key in settings} == settings:
        return existing
    streams, details = build()
    (out / MANIFEST).unlink(missing_ok=True)  # never readable as complete while being rewritten
    manifest = write_token_dataset(out, streams, source={**settings, **details}, **dataset)
    _remove_stale_shards(out, manifest)
    return manifest


def _complete_manifest(out: Path) -> Manifest | None:
    try:
        return read_manifest(str(out))
    except DataError:
        return None


def _remove_stale_shards(out: Path, manifest: Manifest) -> None:
    """Delete the shards of an earlier, different preparation of this directory that the new one did not
    overwrite (it may have had more shards or other splits)."""
    keep = {s.name for info in manifest.splits.values() for s in info.shards}
    for stale in out.iterdir():
        if _SHARD_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()


def _tokenize_task(task: Task, tokenizer_name: str, stem: Path) -> tuple[Path, str, _PartResult, int]:
    """Worker: tokenize one task into `<stem>.<split>.npy` files, unless an earlier run already did."""
    fingerprint = _digest({"task": task.fingerprint(), "tokenizer": tokenizer_name})
    record = stem.with_suffix(".json")
    done = _load_record(record, fingerprint)
    if done is not None and all(stem.with_suffix(f".{split}.npy").exists() for split in done["tokens"]):
        return stem, fingerprint, _PartResult(**done), task.size
    tokenizer = get_tokenizer(tokenizer_name)
    eos = np.array([tokenizer.eos_id], dtype=token_dtype(tokenizer.vocab_size))
    chunks: dict[str, list[np.ndarray]] = {}
    documents: dict[str, int] = {}
    for split, text, end_of_document in task.pieces():
        chunks.setdefault(split, []).append(tokenizer.encode(text))
        if end_of_document:
            chunks[split].append(eos)
            documents[split] = documents.get(split, 0) + 1
    tokens = {}
    for split, arrays in chunks.items():
        data = np.concatenate(arrays)
        _atomic_save(stem.with_suffix(f".{split}.npy"), data)
        tokens[split] = int(data.size)
    result = _PartResult(tokens, documents)
    _write_record(record, fingerprint, asdict(result))
    return stem, fingerprint, result, task.size


def _pack_shard(
    path: Path,
    record: Path,
    sources: list[tuple[Path, str, int]],
    span: tuple[int, int],
    settings: Settings,
    pad_id: int,
) -> ShardInfo:
    """Worker: write the shard holding tokens [span) of a split's concatenated parts, unless already done."""
    fingerprint = _digest({"span": span, "parts": [(fp, n) for _, fp, n in sources], "settings": asdict(settings)})
    done = _load_record(record, fingerprint)
    if done is not None and path.exists():
        return ShardInfo(**done)
    pieces, offset = [], 0
    for part, _, n in sources:
        lo, hi = max(span[0], offset), min(span[1], offset + n)
        if lo < hi:
            pieces.append(np.load(part, mmap_mode="r")[lo - offset : hi - offset])
        offset += n
    shard = write_shard(path, np.concatenate(pieces), settings.block_len, pad_id)
    _write_record(record, fingerprint, asdict(shard))
    return shard


_T = TypeVar("_T")


def run_jobs(jobs: Iterator[tuple[Callable[..., _T], tuple[Any, ...]]], workers: int) -> Iterator[_T]:
    """Run jobs, in this process or a process pool, yielding results in job order.

    At most 2 x workers jobs are in flight, so a lazily produced job stream (a genome read from disk)
    never piles up in memory. Workers start with `spawn`: forking a parent that already runs tokenizer
    or progress-bar threads can deadlock.
    """
    if workers <= 1:
        for func, args in jobs:
            yield func(*args)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: list[Future[_T]] = []
        try:
            for func, args in jobs:
                pending.append(pool.submit(func, *args))
                if len(pending) >= 2 * workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _load_record(path: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return body["result"] if body.get("fingerprint") == fingerprint else None


def _write_record(path: Path, fingerprint: str, result: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "result": result}))
    os.replace(tmp, path)


def _atomic_save(path: Path, data: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, data, allow_pickle=False)
    os.replace(tmp, path)
