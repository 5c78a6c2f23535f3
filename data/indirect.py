"""The indirect-indexing task of the PoPE paper (arXiv 2509.10534), generated as a fixed-length token dataset.

A problem is a string of 20-40 distinct letters (drawn from A-Z a-z without replacement), a source letter of
the string and a shift; the answer is the letter `shift` places from the source. The model must find the
source ("what") and then move by a relative offset ("where"), which is the distinction PoPE is built for: the
paper reports 94.82% accuracy for PoPE against 11.16% for RoPE (chance: about 1/52 = 1.9%).

Sampling. The length is uniform in [20, 40], the source position uniform over the string, and the shift
uniform over the valid shifts in [-15, +15], those that keep the target inside the string. Shift 0 is one of
them, as in the paper's range; its answer is the source letter itself.

Text and tokens. A problem reads `<string>,<source>,<signed shift>=<target>`, e.g.
`oHBKRksDJOGxMCQIgXUEbwdWeL,e,+1=L`: one token per character, then <end>, then <pad> up to exactly
SAMPLE_LEN = 64 tokens (the longest problem takes 49 with its <end>). `=` is the answer marker: the trainer
scores only the token after it. Vocabulary (68 ids, the `indirect-char` tokenizer of pope_lm.data.tokenizers):

    0 <pad>, 1 <end>, 2-27 A-Z, 28-53 a-z, 54-63 0-9, 64 +, 65 -, 66 , (separator), 67 = (answer marker)

<end> is the dataset's end-of-document id, kept apart from <pad> so that the manifest counts one document per
problem.

Determinism. Problems come in generation chunks of CHUNK problems, chunk c of split s drawn from
`default_rng([seed, s, c])` (train s = 0, val 1, test 2) and cut to the requested count, so a dataset is a pure
function of (seed, counts), and a smaller dataset is a prefix of a larger one. Val and test are streams
independent of the train stream, not checked against it: with 52!/32! ~ 10^32.5 strings of the shortest
length alone, a problem that appears in two splits is practically impossible.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .errors import DataError
from .prepare import prepare_generated
from .shards import Manifest
from .tokenizers import IndirectCharTokenizer

TOKENIZER = IndirectCharTokenizer.name
SAMPLE_LEN = 64
MIN_LEN, MAX_LEN = 20, 40
MAX_SHIFT = 15
CHUNK = 1 << 14  # problems per generation chunk (part of the generator's definition: changing it changes the data)
SPLIT_SIZES = {"train": 1_000_000, "val": 10_000, "test": 10_000}
SHARD_SAMPLES = 1 << 14  # samples per shard: 2 MiB shards, 62 for the 1M training problems

# The vocabulary is the `indirect-char` tokenizer's (pope_lm.data.tokenizers), which `pope-lm sample` also uses.
PAD, END = IndirectCharTokenizer.pad_id, IndirectCharTokenizer.eos_id
LETTERS = string.ascii_uppercase + string.ascii_lowercase
CHARS = IndirectCharTokenizer.vocab
VOCAB_SIZE = IndirectCharTokenizer.vocab_size
LETTER0 = CHARS.index("A")
DIGIT0 = CHARS.index("0")
PLUS, MINUS, SEP, ANSWER = (CHARS.index(c) for c in "+-,=")
_TOKENIZER = IndirectCharTokenizer()
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Problems:
    """A batch of problems as arrays: letter indices into LETTERS (column j < lengths[i] is letter j of string i;
    the rest is -1), the source position in the string and the shift."""

    letters: np.ndarray  # (n, MAX_LEN) int8
    lengths: np.ndarray  # (n,)
    source: np.ndarray  # (n,)
    shift: np.ndarray  # (n,)

    @property
    def target(self) -> np.ndarray:
        """Position of the answer letter in the string."""
        return self.source + self.shift

    def __len__(self) -> int:
        return len(self.lengths)

    def text(self, i: int) -> str:
        """Problem i as the text its tokens spell."""
        word = "".join(LETTERS[j] for j in self.letters[i, : self.lengths[i]])
        return f"{word},{word[self.source[i]]},{self.shift[i]:+d}={word[self.target[i]]}"


def generate(n: int, rng: np.random.Generator) -> Problems:
    """n problems drawn with `rng` (see the module docstring for the distribution), vectorized over problems."""
    letters = np.argsort(rng.random((n, len(LETTERS))), axis=1)[:, :MAX_LEN].astype(np.int8)  # random permutations
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, n)
    letters[np.arange(MAX_LEN) >= lengths[:, None]] = -1
    source = rng.integers(0, lengths)
    lowest, highest = np.maximum(-MAX_SHIFT, -source), np.minimum(MAX_SHIFT, lengths - 1 - source)
    shift = rng.integers(lowest, highest + 1)
    return Problems(letters, lengths, source, shift)


def problems(split: str, n: int, seed: int = 0) -> Problems:
    """The first n problems of a split's stream: whole chunks generated, then cut, so n never changes them."""
    if split not in _SPLIT_STREAM:
        raise DataError(f"unknown split '{split}' (valid: {', '.join(_SPLIT_STREAM)})")
    count = max(1, -(-n // CHUNK))
    chunks = [generate(CHUNK, np.random.default_rng([seed, _SPLIT_STREAM[split], c])) for c in range(count)]
    return Problems(*(np.concatenate([getattr(c, f.name) for c in chunks])[:n] for f in fields(Problems)))


def encode_problems(batch: Problems) -> np.ndarray:
    """(n, SAMPLE_LEN) uint8 token rows: string, `,`, source, `,`, sign, one or two digits, `=`, target, <end>,
    padding. Built column-wise: every row's tail starts right after its string."""
    n = len(batch)
    rows = np.arange(n)
    tokens = np.full((n, SAMPLE_LEN), PAD, dtype=np.uint8)
    tokens[:, :MAX_LEN] = np.where(batch.letters >= 0, LETTER0 + batch.letters, PAD)
    source = LETTER0 + batch.letters[rows, batch.source]
    target = LETTER0 + batch.letters[rows, batch.target]
    size = np.abs(batch.shift)
    two = size >= 10  # a two-digit shift moves `=`, the target and <end> one column right
    tail = np.stack(
        [
            np.full(n, SEP),
            source,
            np.full(n, SEP),
            np.where(batch.shift < 0, MINUS, PLUS),
            DIGIT0 + np.where(two, size // 10, size),
            np.where(two, DIGIT0 + size % 10, ANSWER),
            np.where(two, ANSWER, target),
            np.where(two, target, END),
            np.where(two, END, PAD),
        ],
        axis=1,
    )
    tokens[rows[:, None], batch.lengths[:, None] + np.arange(tail.shape[1])] = tail
    return tokens


def encode(text: str) -> np.ndarray:
    """Token ids of a problem's text (no <end>, no padding); the `indirect-char` tokenizer's encode."""
    return _TOKENIZER.encode(text)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """The text of token ids; <end> and <pad> are structure, not text, and are dropped."""
    return _TOKENIZER.decode(ids)


def split_stream(tokens: np.ndarray, shard_samples: int) -> np.ndarray:
    """One split's stream: the sample rows in order, with one <pad> after every `shard_samples` samples.

    The loader cuts a shard into windows of SAMPLE_LEN + 1 tokens with stride SAMPLE_LEN, so a shard of k
    samples only gives k windows when it holds one token more than k samples: the extra <pad> is the last
    window's final target (never scored). Written with shard_tokens = shard_samples * SAMPLE_LEN + 1, every
    shard starts at a sample boundary and every sample is a window of its own.
    """
    pad = np.full(1, PAD, dtype=tokens.dtype)
    pieces = []
    for start in range(0, len(tokens), shard_samples):
        pieces += [tokens[start : start + shard_samples].ravel(), pad]
    return np.concatenate(pieces)


def prepare_indirect(
    out_dir: str | Path,
    *,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    shard_samples: int = SHARD_SAMPLES,
) -> Manifest:
    """Generate the task's splits (default 1M / 10k / 10k problems) into a dataset directory; a no-op when it
    already holds the same ones."""
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    if sizes["train"] < 1 or min(sizes.values()) < 0 or shard_samples < 1:
        raise DataError(f"split sizes must be >= 0 with at least one training problem, got {sizes}")
    settings = {
        "kind": "indirect",
        "generator": "pope-lm indirect/1",
        "seed": seed,
        "sizes": sizes,
        "chunk": CHUNK,
        "shard_samples": shard_samples,
        "text": "<string>,<source>,<signed shift>=<target>",
        "vocabulary": list(CHARS),
    }

    def build() -> tuple[dict[str, np.ndarray], dict[str, object]]:
        streams = {
            split: split_stream(encode_problems(problems(split, n, seed)), shard_samples)
            for split, n in sizes.items()
            if n
        }
        return streams, {}

    return prepare_generated(
        out_dir,
        settings,
        build,
        tokenizer=TOKENIZER,
        vocab_size=VOCAB_SIZE,
        eos_id=END,
        shard_tokens=shard_samples * SAMPLE_LEN + 1,
        sample_len=SAMPLE_LEN,
        answer_marker=ANSWER,
    )
