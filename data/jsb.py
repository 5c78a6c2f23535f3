"""Bach's four-part chorales (the PoPE paper's JSB task) from music21's bundled corpus, as a packed token dataset.

The paper used Boulanger-Lewandowski's JSB Chorales (382 chorales split 229 / 76 / 77). That data is not
bundled anywhere installable, so this module rebuilds the task from the Bach chorales that ship with music21
(`music21.corpus.getComposer('bach')`, 433 files in music21 10.5), converted the way the paper describes:

- Voices. Only scores with exactly four parts named Soprano, Alto, Tenor, Bass, in that order, are used (365
  in music21 10.5). The rest are skipped and listed with the reason in the manifest's `source.skipped`:
  roman-numeral analyses (.rntxt), chorales with instrumental parts besides the voices (some are versions of
  kept chorales, e.g. bwv112.5-sc), split sopranos, Humdrum (.krn) files whose parts carry no names (so no
  known voice order), a keyboard piece.
- Grid. Time is sampled every 16th note from the score's start (pickup measures included): a voice's value
  at step k is the pitch sounding at k/4 quarter notes, or a silence where it rests. Notes shorter than or
  off the grid (triplets, 32nds, grace notes) count only at the steps they sound at; a repeated note reads
  as one held note, as in the piano rolls of the original dataset.
- Raster order. The steps follow each other; within a step the voices come Soprano, Alto, Tenor, Bass, so a
  chorale of T steps is 4T tokens, followed by the end-of-chorale token.
- Vocabulary (90, as in the paper; the `jsb-16th` tokenizer of pope_lm.data.tokenizers, which also gives
  the tokens a text form, note names one step per line): 0 end-of-chorale, 1-88 MIDI pitches 21-108 (the
  piano range; a chorale's voices span 36-81), 89 silence.
- Split. The names of the kept chorales, sorted, are permuted with `default_rng(seed)` and cut in the
  paper's proportions 76/382 validation and 77/382 test (rounded), the rest training: 218 / 73 / 74 for
  music21 10.5's 365 chorales. Each split's chorales, in name order, form one packed stream (no sample_len):
  a recipe's seq_len windows it, across chorale boundaries.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .errors import DataError, first_line
from .prepare import prepare_generated, run_jobs
from .shards import Manifest
from .tokenizers import JsbTokenizer

# The vocabulary is the `jsb-16th` tokenizer's (pope_lm.data.tokenizers), which `pope-lm sample` also uses.
TOKENIZER = JsbTokenizer.name
VOICES = JsbTokenizer.voices
STEPS_PER_QUARTER = 4  # 16th notes
END, SILENCE = JsbTokenizer.eos_id, JsbTokenizer.silence_id
LOWEST_MIDI, HIGHEST_MIDI = JsbTokenizer.lowest_midi, JsbTokenizer.highest_midi  # ids 1..88
VOCAB_SIZE = JsbTokenizer.vocab_size
REST = -1  # a silent voice in a pitch grid
PAPER_SPLIT = {"train": 229, "val": 76, "test": 77}


def require_music21() -> Any:
    """The music21 module, or a one-line DataError saying how to get it (it is an optional dependency)."""
    try:
        import music21
    except ImportError:
        raise DataError("the jsb dataset is made from music21's Bach chorales: pip install music21") from None
    return music21


def chorale_files() -> list[Path]:
    """Every file of music21's Bach corpus, sorted by name."""
    return sorted(require_music21().corpus.getComposer("bach"), key=lambda p: p.name)


def read_chorale(path: str) -> tuple[np.ndarray | None, str]:
    """(pitch grid, "") of a four-part chorale, or (None, why it is skipped) for any other file of the corpus.

    Parsed from the file itself: music21's pickle cache (`forceSource`, `storePickle`) is neither read nor
    written, so nothing but the dataset is left on disk.
    """
    if path.endswith(".rntxt"):
        return None, "a roman-numeral analysis, not a score"
    m21 = require_music21()
    try:
        score = m21.converter.parse(path, forceSource=True, storePickle=False)
    except Exception as exc:  # music21 raises many exception types for unreadable files
        raise DataError(f"{path}: music21 cannot parse it ({first_line(exc)})") from None
    names = tuple(part.partName for part in getattr(score, "parts", ()))
    if names != VOICES:
        return None, f"parts {', '.join(map(str, names))}: not exactly {', '.join(VOICES)}"
    grid = pitch_grid(score)
    sounding = grid[grid != REST]
    if sounding.size and (sounding.min() < LOWEST_MIDI or sounding.max() > HIGHEST_MIDI):
        raise DataError(f"{path}: pitches {sounding.min()}-{sounding.max()} leave MIDI {LOWEST_MIDI}-{HIGHEST_MIDI}")
    return grid, ""


def pitch_grid(score: Any) -> np.ndarray:
    """(steps, 4) MIDI pitches of the four parts on the 16th-note grid, REST where a voice is silent.

    A chord in a voice (none in the kept chorales) gives its top note.
    """
    steps = math.ceil(score.highestTime * STEPS_PER_QUARTER)
    grid = np.full((steps, len(VOICES)), REST, dtype=np.int16)
    for voice, part in enumerate(score.parts):
        for note in part.flatten().notes:
            start = math.ceil(note.offset * STEPS_PER_QUARTER)
            stop = math.ceil((note.offset + note.quarterLength) * STEPS_PER_QUARTER)
            grid[start:stop, voice] = max(p.midi for p in note.pitches)
    return grid


def grid_tokens(grid: np.ndarray) -> np.ndarray:
    """A chorale's tokens: the grid in raster order (step by step, voices S A T B), then end-of-chorale."""
    ids = np.where(grid == REST, SILENCE, grid - (LOWEST_MIDI - 1)).astype(np.uint8)
    return np.append(ids.ravel(), np.uint8(END))


def tokens_grid(tokens: np.ndarray) -> np.ndarray:
    """The pitch grid of one chorale's tokens (the inverse of grid_tokens; a final end-of-chorale is optional)."""
    ids = np.asarray(tokens, dtype=np.int16)
    if ids.size and ids[-1] == END:
        ids = ids[:-1]
    if ids.size % len(VOICES) or (ids == END).any():
        raise DataError(f"{ids.size} tokens are not one chorale of whole {len(VOICES)}-voice steps")
    return np.where(ids == SILENCE, REST, ids + (LOWEST_MIDI - 1)).reshape(-1, len(VOICES))


def split_chorales(names: Sequence[str], seed: int) -> dict[str, list[str]]:
    """Train / val / test chorale names: a seeded permutation of the sorted names cut in the paper's proportions."""
    order = [sorted(names)[i] for i in np.random.default_rng(seed).permutation(len(names))]
    total = sum(PAPER_SPLIT.values())
    val, test = (round(len(names) * PAPER_SPLIT[s] / total) for s in ("val", "test"))
    return {"train": sorted(order[val + test :]), "val": sorted(order[:val]), "test": sorted(order[val : val + test])}


def prepare_jsb(
    out_dir: str | Path, *, files: Sequence[str | Path] | None = None, seed: int = 0, workers: int = 0
) -> Manifest:
    """Convert the chorales (all of music21's Bach corpus, or `files`) into a dataset directory; a no-op when it
    already holds the same conversion. `workers` parse in parallel (0: one per CPU)."""
    m21 = require_music21()
    paths = sorted((Path(f) for f in files), key=lambda p: p.name) if files is not None else chorale_files()
    inputs = hashlib.sha256("".join(f"{p.name}:{p.stat().st_size};" for p in paths).encode()).hexdigest()[:32]
    settings = {
        "kind": "jsb",
        "corpus": f"music21=={m21.__version__} corpus bach",
        "inputs": len(paths),
        "inputs_sha256": inputs,  # of the file names and sizes
        "voices": list(VOICES),
        "steps_per_quarter": STEPS_PER_QUARTER,
        "vocabulary": f"{END} end, 1-88 MIDI {LOWEST_MIDI}-{HIGHEST_MIDI}, {SILENCE} silence",
        "seed": seed,
    }

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        grids: dict[str, np.ndarray] = {}
        skipped: dict[str, str] = {}
        jobs = ((read_chorale, (str(p),)) for p in paths)
        with tqdm(total=len(paths), unit="file", desc="parse", disable=None) as bar:
            for path, (grid, reason) in zip(paths, run_jobs(jobs, workers or os.cpu_count() or 1), strict=True):
                if grid is None:
                    skipped[path.name] = reason
                else:
                    grids[path.name] = grid
                bar.update(1)
        splits = split_chorales(list(grids), seed)
        if not splits["train"]:
            raise DataError(f"{len(grids)} four-part chorale(s) among {len(paths)} files: too few for a training split")
        streams = {s: np.concatenate([grid_tokens(grids[n]) for n in names]) for s, names in splits.items() if names}
        return streams, {"splits": splits, "skipped": skipped}

    return prepare_generated(out_dir, settings, build, tokenizer=TOKENIZER, vocab_size=VOCAB_SIZE, eos_id=END)
