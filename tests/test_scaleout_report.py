"""benchmarks/scaleout.py: which result files `report` counts as runs, and, end to end on the CPU, that one rank and
two follow the same loss curve at the same global batch when the data has fixed streams (issue 9's comparison)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "scaleout.py"


def _worker_record(**changes: object) -> dict[str, object]:
    """What a worker writes when its training ends (before `run` labels the file with its spec)."""
    record = {"first_step": 1, "losses": [9.0, 8.5, 8.0], "tokens_per_s": 1000.0, "timed_steps": 2,
              "peak_allocated_gib": [1.0, 1.0], "peak_reserved_gib": [1.5, 1.5], "recipe": "tiny",
              "strategy": "deepspeed", "zero_stage": 3, "gpus": 2, "stop_at": None, "micro_batch_size": 4,
              "global_batch_size": 8, "seq_len": 64, "precision": "bf16-mixed", "device": "cpu",
              "versions": {"torch": "x"}, "date": "2026-11-26"}
    record.update(changes)
    return record


def _report(tmp_path: Path, files: dict[str, dict[str, object]]) -> subprocess.CompletedProcess[str]:
    for name, record in files.items():
        (tmp_path / name).write_text(json.dumps(record))
    return subprocess.run([sys.executable, str(SCRIPT), "report", *sorted(map(str, tmp_path.iterdir()))],
                          capture_output=True, text=True, check=False)


def test_a_whole_run_whose_launcher_was_stopped_after_it_finished_is_reported(tmp_path: Path) -> None:
    done = _report(tmp_path, {"tiny-zero3-2.part0.json": _worker_record(),
                              "tiny-ddp-2.json": _worker_record(strategy="ddp", zero_stage=None, spec="ddp:2")})
    assert done.returncode == 0, done.stderr
    assert "| zero3:2 | 1,000 |" in done.stdout and "| ddp:2 | 1,000 |" in done.stdout
    assert "read" in done.stderr and "as zero3:2" in done.stderr


def test_a_run_cut_short_or_a_resumed_half_is_skipped(tmp_path: Path) -> None:
    done = _report(tmp_path, {"a.part0.json": _worker_record(stop_at=2),  # the first half of a :resume run
                              "b.part1.json": _worker_record(first_step=3),  # its resumed half
                              "c.json": _worker_record(strategy="ddp", zero_stage=None, spec="ddp:2")})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("skipped") == 2
    assert "zero3" not in done.stdout


def test_one_rank_and_two_follow_the_same_curve_with_fixed_streams(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--recipe", "recipes/tiny.yaml", "--steps", "6", "--warmup", "2",
         "--out", str(tmp_path), "--runs", "ddp:1", "ddp:2", "--", "trainer.accelerator=cpu", "data.streams=2",
         "trainer.micro_batch_size=4", "data.val_batches=1", "trainer.test_at_end=false"],
        cwd=SCRIPT.parent.parent, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"tiny-ddp-{n}.json").read_text())["losses"] for n in (1, 2))
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5  # fp32 on the CPU: reduction order only
