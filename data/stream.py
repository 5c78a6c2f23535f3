"""The training and evaluation streams: what DataLoader workers run, kept free of Lightning so that
workers started with `spawn` (e.g. under Lightning's ddp_spawn) import only numpy and torch.

The layout, shuffle and resume rules are described in `pope_lm.data.datamodule`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import DataError
from .shards import ShardInfo, member_url, read_blocks


@dataclass(frozen=True)
class Layout:
    """Everything that decides which sample lands in which batch of which rank."""

    world_size: int
    workers: int  # worker roles per rank: max(1, num_workers), since 0 workers read like 1
    micro_batch_size: int
    seq_len: int
    shuffle_buffer: int
    seed: int
    streams: int = 0  # data.streams: 0 = one stream per (rank, worker role) slot; N = N streams in a fixed order

    @property
    def stream_count(self) -> int:
        """How many streams share the shard visits: stream v takes visits base + v, base + v + count, ..."""
        return self.streams or self.world_size * self.workers

    def batch_source(self, rank: int, j: int) -> tuple[int, int]:
        """(stream, index of the micro-batch in that stream) of rank's j-th training micro-batch."""
        if not self.streams:  # one stream per slot: a rank's batch j comes from its worker role j % workers
            return rank * self.workers + j % self.workers, j // self.workers
        # Fixed streams: global micro-batch u = j x world_size + rank (an optimizer step takes the ranks'
        # micro-batches in turn), and u is micro-batch u // streams of stream u % streams, whatever the world size.
        u = j * self.world_size + rank
        return u % self.streams, u // self.streams

    def delivered(self, stream: int, consumed: int) -> int:
        """Micro-batches a stream has delivered once every rank has consumed `consumed`."""
        if not self.streams:
            role = stream % self.workers
            return max(0, -(-(consumed - role) // self.workers))
        return max(0, -(-(consumed * self.world_size - stream) // self.streams))


@dataclass(frozen=True)
class SplitSource:
    """Where a split's shards are and how to cut them into windows (picklable for DataLoader workers)."""

    location: str
    shards: tuple[ShardInfo, ...]
    block_len: int
    dtype: str
    seq_len: int

    def samples_in(self, shard: ShardInfo) -> int:
        return max(0, (shard.tokens - 1) // self.seq_len)

    def windows(
        self, shard: ShardInfo, start: int = 0, chunk: int = 0, shuffle_key: tuple[int, ...] = ()
    ) -> Iterator[np.ndarray]:
        """Windows start, start + 1, ... of one shard visit in emission order: with a shuffle_key and chunk > 1,
        each chunk of `chunk` windows is permuted by a generator seeded with shuffle_key + (chunk index,);
        otherwise the windows come in order."""
        n, seq = self.samples_in(shard), self.seq_len
        shuffle = bool(shuffle_key) and chunk > 1
        chunk = chunk if shuffle else n
        first_chunk = start // chunk
        first_block = first_chunk * chunk * seq // self.block_len
        blocks = read_blocks(
            member_url(self.location, shard.name), shard, self.block_len, np.dtype(self.dtype), first_block
        )
        reader = TokenReader(blocks, first_block * self.block_len, shard.name)
        for q in range(first_chunk, math.ceil(n / chunk)):
            lo, hi = q * chunk, min(q * chunk + chunk, n)
            tokens = reader.read(lo * seq, hi * seq + 1)
            windows = np.lib.stride_tricks.sliding_window_view(tokens, seq + 1)[::seq]
            order = np.arange(hi - lo)
            if shuffle:
                order = np.random.default_rng(np.random.SeedSequence([*shuffle_key, q])).permutation(order)
            for i in order[max(0, start - lo) :]:
                yield windows[i]
        reader.finish()


class TokenReader:
    """Contiguous token ranges from a shard's block stream, read forward only."""

    def __init__(self, blocks: Iterator[np.ndarray], start: int, name: str) -> None:
        self._blocks, self._start, self._name = blocks, start, name
        self._buffer = np.empty(0, dtype=np.int64)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) as a new array (earlier windows stay valid); lo never moves backwards."""
        pieces = [self._buffer]
        have = self._start + self._buffer.size
        while have < hi:
            block = next(self._blocks, None)
            if block is None:
                raise DataError(f"corrupt shard {self._name}: ended before token {hi}")
            pieces.append(block)
            have += block.size
        self._buffer = np.concatenate(pieces)[lo - self._start :]
        self._start = lo
        return self._buffer[: hi - lo]

    def finish(self) -> None:
        """Read the rest of the shard so that its block count and checksum get verified."""
        for _ in self._blocks:
            pass


@dataclass
class TrainPlan:
    """The endless sequence of shard visits and the streams that take them (see pope_lm.data.datamodule)."""

    source: SplitSource
    layout: Layout
    base: int
    skip_corrupt: bool = False
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def shard_at(self, position: int) -> ShardInfo:
        n = len(self.source.shards)
        epoch, index = divmod(position, n)
        if epoch not in self._perms:
            seq = np.random.SeedSequence([self.layout.seed, 0, epoch])
            self._perms[epoch] = np.random.default_rng(seq).permutation(n)
        return self.source.shards[self._perms[epoch][index]]

    def locate(self, stream: int, samples_done: int) -> tuple[int, int]:
        """(visit position, offset in it) of a stream's next sample after it delivered samples_done."""
        position = self.base + stream
        while True:
            n = self.source.samples_in(self.shard_at(position))
            if samples_done < n:
                return position, samples_done
            samples_done -= n
            position += self.layout.stream_count

    def samples(self, stream: int, samples_done: int, skipped: Any) -> Iterator[np.ndarray]:
        position, offset = self.locate(stream, samples_done)
        failures = 0
        while True:
            try:
                yield from self.source.windows(
                    self.shard_at(position), offset, self.layout.shuffle_buffer, (self.layout.seed, 1, position)
                )
                failures = 0
            except DataError as exc:
                failures += 1
                if not self.skip_corrupt or failures >= len(self.source.shards):
                    raise
                warnings.warn(f"skipping the rest of a shard (data.skip_corrupt=true): {exc}", stacklevel=1)
                with skipped.get_lock():
                    skipped.value += 1
            position, offset = position + self.layout.stream_count, 0


class TrainStream(IterableDataset):
    """One rank's endless stream of micro-batches, split over the DataLoader's workers."""

    def __init__(self, plan: TrainPlan, rank: int, consumed: int, skipped: Any) -> None:
        self.plan, self.rank, self.consumed, self.skipped = plan, rank, consumed, skipped

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        layout = self.plan.layout
        if workers != layout.workers:
            raise DataError(f"the stream was laid out for {layout.workers} workers but runs in {workers}")
        # Round-robin resumes at the role that was next: this loader's worker 0 plays role consumed % workers,
        # and the role yields the rank's batches j = role, role + workers, ... from the first one not consumed.
        role = (worker + self.consumed) % workers
        j = self.consumed + (role - self.consumed) % workers
        opened: dict[int, Iterator[np.ndarray]] = {}  # fixed streams: a role reads N / (ranks x workers) in turn
        while True:
            stream, index = layout.batch_source(self.rank, j)
            if stream not in opened:
                opened[stream] = self.plan.samples(stream, index * layout.micro_batch_size, self.skipped)
            samples = opened[stream]
            batch = np.stack([next(samples) for _ in range(layout.micro_batch_size)])
            yield torch.from_numpy(batch.astype(np.int64))
            j += workers


class EvalStream(IterableDataset):
    """A rank's share of a split in fixed order: global batch j goes to rank j % world_size."""

    def __init__(
        self, source: SplitSource, rank: int, world_size: int, micro_batch_size: int, batches: int, wrap: bool
    ) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size
        self.micro_batch_size, self.batches, self.wrap = micro_batch_size, batches, wrap

    def __iter__(self) -> Iterator[torch.Tensor]:
        needed = self.batches * self.world_size * self.micro_batch_size
        if needed == 0:
            return
        rows: list[np.ndarray] = []
        for index, window in enumerate(self._ordered()):
            if index >= needed:
                return
            if (index // self.micro_batch_size) % self.world_size == self.rank:
                rows.append(window)
                if len(rows) == self.micro_batch_size:
                    yield torch.from_numpy(np.stack(rows).astype(np.int64))
                    rows = []

    def _ordered(self) -> Iterator[np.ndarray]:
        while True:
            for shard in self.source.shards:
                yield from self.source.windows(shard)
            if not self.wrap:
                return
