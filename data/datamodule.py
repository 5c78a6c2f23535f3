"""The streaming LightningDataModule: (micro_batch, seq_len + 1) token blocks with exact resume.

How the training stream is laid out (all of it a pure function of seed, dataset and layout):

- Samples. A shard's tokens give windows of seq_len + 1 tokens with stride seq_len (consecutive windows
  share one token, so every token after the first is a target exactly once); window i of a shard covers
  tokens [i * seq_len, i * seq_len + seq_len + 1). Windows never cross shard boundaries.
- Shard order. Epoch e visits the train shards in a permutation drawn from (seed, e); concatenating the
  epochs gives an endless sequence of shard visits, position p = e * n_shards + index.
- Streams. V streams share the visits: stream v takes p = base + v, base + v + V, base + v + 2V, ..., so
  within an epoch every shard goes to exactly one stream, and every stream gets visits forever: no rank ever
  runs dry (no DDP hang). By default (data.streams = 0) there is one stream per slot, i.e. per (rank, worker
  role) pair: V = ranks x workers and slot s = rank * workers + role is stream s. With data.streams = N the
  streams are fixed and the order is global: training micro-batch u (counted over all ranks, an optimizer
  step taking the ranks' micro-batches in turn: rank r's batch j is u = j * ranks + r) is micro-batch u // N
  of stream u % N. Every optimizer step then holds the same samples on any number of ranks and workers whose
  product divides N, so runs on 1 and on 8 GPUs follow the same curve, and a run can resume on another
  number of GPUs. Each worker role reads N / (ranks x workers) streams in turn.
- Shuffle. A visit cuts the shard's windows into consecutive chunks of `shuffle_buffer` windows and emits
  each chunk in a permutation drawn from (seed, p, chunk). A chunk shuffle rather than a reservoir buffer
  keeps the loader state a single counter instead of a buffer of samples per worker.
- Batches. Each worker yields whole micro-batches of consecutive samples of a stream; the DataLoader takes
  batches from its workers round-robin, so batch j of a rank comes from worker role j % workers.

Resume. The state is the number of micro-batches the training loop consumed (counted in
`on_after_batch_transfer`, so batches that workers prefetched but the loop never used do not count),
plus `base`. From that count every stream's position follows (per slot: role r delivered ceil((n - r) /
workers) batches; fixed streams: stream v delivered ceil((n x ranks - v) / N)), i.e. a known number of
samples, which locates its shard visit and the offset inside it by arithmetic on the manifest's token
counts. The resumed loader opens that shard directly, passes over the blocks before the offset without
decoding them, and rotates its worker roles so that its first batch comes from the role that was next.
Consumed shards are never re-read. The count is the same on every rank, so the rank-0 checkpoint restores
all ranks.

Changing world size, workers, micro-batch size, seq_len, shuffle_buffer, streams or seed changes the layout;
with fixed streams a new world size or worker count does not (the count is shared out over the new ranks).
`data.layout_change=refuse` (default) stops with a message; `next_epoch` re-partitions
deterministically: the stream restarts with the new layout at the start of the epoch after the furthest
one any old stream had begun (the rest of the interrupted epoch is skipped, nothing is repeated).
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from pope_lm.config import ConfigError, DataConfig

from .corpora import ensure_shakespeare, shakespeare_dir
from .errors import DataError
from .shards import MANIFEST, Manifest, is_remote, read_manifest
from .stream import EvalStream, Layout, SplitSource, TrainPlan, TrainStream
from .tokenizers import GPT2Tokenizer

# Built-in corpora: name -> tokenizer and vocabulary size, known before the corpus is prepared.
BUILTIN = {"shakespeare": ("gpt2", GPT2Tokenizer.vocab_size)}
LAYOUT_CHANGE = ("refuse", "next_epoch")
_STATE_VERSION = 1


class TokenDataModule(L.LightningDataModule):
    """Streams a prepared dataset (see `pope-lm prepare`) or a built-in corpus as token blocks.

    `vocab_size` and `tokenizer_name` are known right after construction (from the manifest, or for a
    built-in corpus from its tokenizer), so the model can be built before any data is read.
    """

    def __init__(self, cfg: DataConfig, micro_batch_size: int, seed: int) -> None:
        super().__init__()
        _check_config(cfg, micro_batch_size)
        self.cfg, self.micro_batch_size, self.seed = cfg, micro_batch_size, seed
        builtin = BUILTIN.get(cfg.dataset)
        if builtin is not None:
            self.location = str(shakespeare_dir(cfg.cache_dir))
        else:
            self.location = cfg.dataset if is_remote(cfg.dataset) else os.path.expanduser(cfg.dataset)
        self._manifest: Manifest | None = None
        if builtin is None or Path(self.location, MANIFEST).exists():
            self._manifest = self._load_manifest()
            self.tokenizer_name, self.vocab_size = self._manifest.tokenizer, self._manifest.vocab_size
        else:
            self.tokenizer_name, self.vocab_size = builtin
            self._check_tokenizer(self.tokenizer_name)
        self._base = 0  # first shard-visit position of the current layout
        self._consumed = 0  # training micro-batches consumed since `base`
        self._skipped: Any = None  # shared counter of skipped corrupt shards, made with the train loader

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise DataError(f"the built-in corpus '{self.cfg.dataset}' is not prepared yet: call prepare_data()")
        return self._manifest

    @property
    def answer_marker(self) -> int | None:
        """For question/answer datasets, the token id whose successor is the only scored target."""
        return None if self._manifest is None else self._manifest.answer_marker

    def has_split(self, split: str) -> bool:
        return bool(self.manifest.split(split).shards)

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped so far (data.skip_corrupt=true), for logging as a metric."""
        return 0 if self._skipped is None else int(self._skipped.value)

    # ------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Prepare the built-in corpus on first use (Lightning runs this on local rank 0 of each node)."""
        if self.cfg.dataset in BUILTIN and self._manifest is None:
            ensure_shakespeare(self.cfg.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._manifest is None:
            self._manifest = self._load_manifest()

    def train_dataloader(self) -> DataLoader:
        plan = self._plan(self._layout(), self._base)
        self._skipped = multiprocessing.Value("i", 0)
        stream = TrainStream(plan, self._rank(), self._consumed, self._skipped)
        return self._loader(stream, self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Exactly data.val_batches batches per rank, the same ones at every evaluation."""
        return self._eval_loader("val", self.cfg.val_batches)

    def test_dataloader(self) -> DataLoader:
        """Every complete batch of the test split, divided equally over the ranks."""
        source = self._source("test")
        total = sum(source.samples_in(s) for s in source.shards) // self.micro_batch_size
        return self._eval_loader("test", total // self._world_size(), wrap=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Count only batches the training loop actually took; prefetched ones are not consumed yet.
        if self.trainer is not None and self.trainer.training:
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "data_id": self.manifest.data_id,
            "layout": asdict(self._layout()),
            "base": self._base,
            "consumed": self._consumed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise DataError(f"unsupported data-loader state version {state_dict.get('version')} in the checkpoint")
        if state_dict["data_id"] != self.manifest.data_id:
            raise DataError(
                f"the checkpoint was trained on other data (id {state_dict['data_id']}) than "
                f"{self.location} (id {self.manifest.data_id}); resume with the same data.dataset"
            )
        old, new = Layout(**state_dict["layout"]), self._layout()  # checkpoints before data.streams: streams 0
        base, consumed = int(state_dict["base"]), int(state_dict["consumed"])
        if old == new:
            self._base, self._consumed = base, consumed
            return
        same_order = old.streams and replace(old, world_size=new.world_size, workers=new.workers) == new
        if same_order and consumed * old.world_size % new.world_size == 0:
            # Fixed streams: the order is global, and the new ranks share the micro-batches consumed so far.
            self._base, self._consumed = base, consumed * old.world_size // new.world_size
            return
        if self.cfg.layout_change == "refuse":
            raise DataError(
                f"the checkpoint's data stream was laid out for {_describe(old)} but this run has {_describe(new)}; "
                f"set data.layout_change=next_epoch to continue from the next epoch with the new layout"
            )
        self._base = self._next_epoch_base(old, base, consumed)
        self._consumed = 0
        warnings.warn(
            f"data layout changed ({_describe(old)} -> {_describe(new)}): the stream continues at shard visit "
            f"{self._base} (start of the next epoch)",
            stacklevel=1,
        )

    # ---------------------------------------------------------------------------------- internals

    def _load_manifest(self) -> Manifest:
        manifest = read_manifest(self.location)
        self._check_tokenizer(manifest.tokenizer)
        if manifest.sample_len is not None and manifest.sample_len != self.cfg.seq_len:
            # Windows start every seq_len tokens; only seq_len = sample_len puts each sample in its own window.
            raise DataError(f"{self.location} holds samples of {manifest.sample_len} tokens; "
                            f"set data.seq_len={manifest.sample_len} (it is {self.cfg.seq_len})")
        return manifest

    def _check_tokenizer(self, name: str) -> None:
        """data.tokenizer pins the tokenizer a recipe's model was built for; any other dataset is refused."""
        if self.cfg.tokenizer and name != self.cfg.tokenizer:
            raise DataError(f"{self.location} was tokenized with '{name}' but data.tokenizer is '{self.cfg.tokenizer}'")

    def _source(self, split: str, seq_len: int | None = None) -> SplitSource:
        manifest = self.manifest
        seq = seq_len or self.cfg.seq_len
        shards = tuple(s for s in manifest.split(split).shards if s.tokens > seq)
        if not shards:
            raise DataError(
                f"{self.location} has no '{split}' shard with more than data.seq_len={seq} tokens"
                + ("; set data.val_batches=0 to train without validation" if split == "val" else "")
            )
        return SplitSource(self.location, shards, manifest.block_len, manifest.dtype, seq)

    def _plan(self, layout: Layout, base: int) -> TrainPlan:
        return TrainPlan(self._source("train", layout.seq_len), layout, base, self.cfg.skip_corrupt)

    def _eval_loader(self, split: str, batches: int, wrap: bool = True) -> DataLoader:
        if batches == 0:
            return DataLoader([])
        source = self._source(split)
        available = sum(source.samples_in(s) for s in source.shards)
        needed = batches * self._world_size() * self.micro_batch_size
        if wrap and needed > available and self._rank() == 0:
            warnings.warn(
                f"the '{split}' split holds {available} samples of {source.seq_len + 1} tokens but "
                f"{needed} are needed; the stream wraps around and repeats samples",
                stacklevel=1,
            )
        stream = EvalStream(source, self._rank(), self._world_size(), self.micro_batch_size, batches, wrap)
        return self._loader(stream, 0)  # small and read in order: the main process is enough

    def _loader(self, stream: IterableDataset, workers: int) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,  # the streams yield whole micro-batches
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )

    def _next_epoch_base(self, old: Layout, base: int, consumed: int) -> int:
        """Start of the epoch after the furthest one any stream of the old layout had begun."""
        plan = self._plan(old, base)
        furthest = base - 1
        for stream in range(old.stream_count):
            delivered = old.delivered(stream, consumed) * old.micro_batch_size
            if delivered:
                furthest = max(furthest, plan.locate(stream, delivered - 1)[0])
        n_old = len(plan.source.shards)
        return (furthest // n_old + 1) * len(self._source("train").shards)

    def _layout(self) -> Layout:
        cfg = self.cfg
        layout = Layout(
            self._world_size(),
            max(1, cfg.num_workers),
            self.micro_batch_size,
            cfg.seq_len,
            cfg.shuffle_buffer,
            self.seed % 2**63,
            cfg.streams,
        )
        readers = layout.world_size * layout.workers
        if layout.streams % readers:
            raise ConfigError(f"'data.streams' ({layout.streams}) must be a multiple of ranks x workers "
                              f"({layout.world_size} x {layout.workers} = {readers}), or 0")
        return layout

    def _rank(self) -> int:
        return int(self.trainer.global_rank) if self.trainer is not None else 0

    def _world_size(self) -> int:
        return int(self.trainer.world_size) if self.trainer is not None else 1


def _describe(layout: Layout) -> str:
    return (
        f"{layout.world_size} rank(s) x {layout.workers} worker(s), micro-batch {layout.micro_batch_size}, "
        f"seq_len {layout.seq_len}, shuffle_buffer {layout.shuffle_buffer}, seed {layout.seed}"
        + (f", {layout.streams} streams" if layout.streams else "")
    )


def _check_config(cfg: DataConfig, micro_batch_size: int) -> None:
    if cfg.layout_change not in LAYOUT_CHANGE:
        raise ConfigError(f"'data.layout_change' must be one of {', '.join(LAYOUT_CHANGE)}; got '{cfg.layout_change}'")
    for key in ("num_workers", "shuffle_buffer", "val_batches", "streams"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"'data.{key}' must be >= 0; got {getattr(cfg, key)}")
    if cfg.seq_len <= 0 or micro_batch_size <= 0:
        raise ConfigError(
            f"'data.seq_len' and the micro-batch size must be positive; got {cfg.seq_len}, {micro_batch_size}"
        )
