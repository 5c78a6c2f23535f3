"""The on-disk dataset format: webdataset tar shards of fixed-length token blocks plus manifest.json.

A prepared dataset is one directory (or URL prefix) holding

- shards `{split}-{index:06d}.tar`: webdataset tars whose samples are `{block:07d}.npy`, each a 1-D array of
  exactly `block_len` tokens (uint16 when the vocabulary fits, else int32). A split is one packed token
  stream (documents separated by the tokenizer's end-of-document id) cut into shards of `shard_tokens`
  tokens; only the split's last shard is shorter, and its last block is padded with the end-of-document
  id past the shard's `tokens` count.
- `manifest.json`: tokenizer id, vocabulary size, dtype, block length, and per split the shard names with
  their token, block and byte counts and sha256. Task datasets (indirect indexing) also record
  `sample_len` (every sample is padded to exactly that many tokens, so a training window of data.seq_len =
  sample_len tokens starts at a sample boundary) and `answer_marker` (only the token right after this id
  is scored: loss and accuracy on the answer alone). It is written last, atomically (temporary file, then
  `os.replace`), so a dataset whose preparation did not finish has no manifest and is refused.

Fixed-length blocks make "token t of a shard" a pure arithmetic address (block t // block_len), which is
what lets the loader resume mid-shard without decoding the blocks before the resume point.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import DataError, first_line
from .tokenizers import token_dtype

FORMAT = "pope-lm-tokens/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    tokens: int  # real tokens; the padding of a last partial block is not counted
    blocks: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    documents: int = 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass
class Manifest:
    tokenizer: str
    vocab_size: int
    eos_id: int
    dtype: str
    block_len: int
    splits: dict[str, SplitInfo]
    fingerprint: str  # of the prepare inputs and settings: a re-run with the same ones is a no-op
    source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    sample_len: int | None = None  # None: one packed token stream; else fixed-length padded samples
    answer_marker: int | None = None  # None: every next token is a target; else only the one after this id

    @property
    def data_id(self) -> str:
        """Identity of the token data itself (shard names and checksums), checked when a run resumes."""
        digest = hashlib.sha256()
        for split in sorted(self.splits):
            for shard in self.splits[split].shards:
                digest.update(f"{shard.name}:{shard.sha256};".encode())
        return digest.hexdigest()[:16]

    def split(self, name: str) -> SplitInfo:
        return self.splits.get(name, SplitInfo())

    def to_json(self) -> str:
        body = asdict(self)
        for split, info in self.splits.items():
            body["splits"][split]["tokens"] = info.tokens
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, origin: str) -> Manifest:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise DataError(f"{origin}: format '{body.get('format')}' is not {FORMAT}")
            splits = {
                name: SplitInfo([ShardInfo(**s) for s in info["shards"]], int(info["documents"]))
                for name, info in body.pop("splits").items()
            }
            return cls(splits=splits, **body)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{origin}: not a valid manifest ({type(exc).__name__}: {exc})") from None


def is_remote(location: str) -> bool:
    """True for anything webdataset's gopen opens other than a local path (pipe:, http(s), gs, ...)."""
    return "://" in location or location.startswith("pipe:")


def member_url(location: str, name: str) -> str:
    """Where file `name` of a dataset lives: `location` is a directory, a URL prefix, or a template
    containing `{name}` (e.g. `pipe:aws s3 cp s3://bucket/owt/{name} -`)."""
    if "{name}" in location:
        return location.replace("{name}", name)
    if is_remote(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


def read_manifest(location: str) -> Manifest:
    """Load and check a dataset's manifest; a missing one means the dataset is absent or incomplete."""
    url = member_url(location, MANIFEST)
    if not is_remote(location):
        if not os.path.isdir(location):
            raise DataError(f"dataset not found: {location}")
        if not os.path.isfile(url):
            raise DataError(
                f"{location} has no {MANIFEST}: not a prepared dataset, or its preparation did not finish "
                f"(run `pope-lm prepare ...` again to complete it)"
            )
    try:
        with _gopen(url) as stream:
            text = stream.read().decode("utf-8")
    except Exception as exc:  # gopen raises OSError, ValueError or subprocess errors depending on the scheme
        raise DataError(f"cannot read {url}: {first_line(exc)}") from None
    return Manifest.from_json(text, url)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically: readers see either no manifest or the complete one."""
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def write_shard(path: Path, tokens: np.ndarray, block_len: int, pad_id: int) -> ShardInfo:
    """Write `tokens` as one tar shard of fixed-length blocks (atomically) and describe it.

    Members carry no timestamps (mtime 0), so the same tokens always give the same bytes and checksum.
    """
    blocks = -(-tokens.size // block_len)
    padded = np.full(blocks * block_len, pad_id, dtype=tokens.dtype)
    padded[: tokens.size] = tokens
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw:
        hashed = _HashingFile(raw)
        with tarfile.open(fileobj=hashed, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for i, block in enumerate(padded.reshape(blocks, block_len)):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, block, allow_pickle=False)
                member = tarfile.TarInfo(f"{i:07d}.npy")  # webdataset sample key 0000000, field "npy"
                member.size, member.mode = buf.tell(), 0o444
                buf.seek(0)
                tar.addfile(member, buf)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return ShardInfo(path.name, int(tokens.size), blocks, hashed.size, hashed.hexdigest())


def write_token_dataset(
    directory: str | Path,
    streams: dict[str, np.ndarray],
    *,
    tokenizer: str,
    vocab_size: int,
    eos_id: int,
    block_len: int = 4096,
    shard_tokens: int = 1 << 23,
    sample_len: int | None = None,
    answer_marker: int | None = None,
    source: dict[str, Any] | None = None,
) -> Manifest:
    """Write already-tokenized split streams as a dataset: the format without the tokenize phase, for
    token data produced elsewhere, synthetic benchmarks and tests."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    splits: dict[str, SplitInfo] = {}
    for split, tokens in streams.items():
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise DataError(f"split '{split}' holds token ids outside [0, {vocab_size})")
        data = tokens.astype(dtype)
        shards = [
            write_shard(out / f"{split}-{i:06d}.tar", data[start : start + shard_tokens], block_len, eos_id)
            for i, start in enumerate(range(0, data.size, shard_tokens))
        ]
        splits[split] = SplitInfo(shards, int(np.count_nonzero(data == eos_id)))
    digest = hashlib.sha256(json.dumps({k: [s.sha256 for s in v.shards] for k, v in splits.items()}).encode())
    manifest = Manifest(tokenizer, vocab_size, eos_id, dtype.name, block_len, splits, digest.hexdigest()[:32],
                        source=source or {}, sample_len=sample_len, answer_marker=answer_marker)
    write_manifest(out, manifest)
    return manifest


def read_blocks(url: str, shard: ShardInfo, block_len: int, dtype: np.dtype, first: int = 0) -> Iterator[np.ndarray]:
    """Yield blocks `first`, `first + 1`, ... of a shard, streaming it from its start.

    Blocks before `first` are passed over without decoding. Read to the end, the shard is checked
    against the manifest (member names, block count and shape, sha256 of all bytes); any mismatch or
    read error raises a one-line DataError naming the shard.
    """
    try:
        stream = _gopen(url)
    except Exception as exc:
        raise DataError(f"cannot open shard {url}: {first_line(exc)}") from None
    hashed = _HashingFile(stream)
    count = 0
    try:
        with tarfile.open(fileobj=hashed, mode="r|") as tar:
            for count, member in enumerate(tar, start=1):
                index = count - 1
                if member.name != f"{index:07d}.npy":
                    raise DataError(f"corrupt shard {url}: member {index} is '{member.name}'")
                if index < first:
                    continue
                yield _decode_block(tar, member, url, block_len, dtype)
        while hashed.read(1 << 20):  # the tar end-of-archive padding also counts toward the checksum
            pass
    except GeneratorExit:
        # Closed early (a consumer stopped reading, or garbage collection at interpreter exit). Listed first so
        # the except clauses below are not evaluated: at exit the module globals they name may already be None.
        raise
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"corrupt shard {url}: {first_line(exc)}") from None
    finally:
        stream.close()
    if count != shard.blocks:
        raise DataError(f"corrupt shard {url}: {count} blocks, the manifest says {shard.blocks}")
    if hashed.hexdigest() != shard.sha256:
        raise DataError(f"corrupt shard {url}: sha256 differs from the manifest")


def _decode_block(
    tar: tarfile.TarFile, member: tarfile.TarInfo, url: str, block_len: int, dtype: np.dtype
) -> np.ndarray:
    file = tar.extractfile(member)
    data = file.read() if file is not None else b""
    block = np.load(io.BytesIO(data), allow_pickle=False)
    if block.dtype != dtype or block.shape != (block_len,):
        raise DataError(
            f"corrupt shard {url}: {member.name} holds {block.dtype} {block.shape}, expected {dtype} ({block_len},)"
        )
    return block


def _gopen(url: str) -> BinaryIO:
    """Open a local path or any URL webdataset's gopen handles (pipe:, http(s), gs, hf, ...).

    Imported here, not at module level: webdataset imports torch, which prepare's worker processes
    (they only write shards) should not pay for.
    """
    from webdataset.gopen import gopen

    return gopen(url, "rb")


class _HashingFile:
    """A pass-through file object that sha256-hashes and counts every byte read or written."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        self._sha.update(data)
        self.size += len(data)
        return data

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        self.size += len(data)
        return self._file.write(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()
