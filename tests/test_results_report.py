"""docs/results.md is generated: it must be exactly what experiments/report.py makes of the committed runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from launch_helpers import REPO


def test_docs_results_md_is_what_report_py_makes_of_the_committed_runs(tmp_path: Path) -> None:
    # A hand edit of the markdown, or a change to the generator or the results without regenerating, fails here.
    out = tmp_path / "results.md"
    subprocess.run([sys.executable, "experiments/report.py", "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    assert out.read_text() == (REPO / "docs" / "results.md").read_text()
    assert sorted(p.name for p in (tmp_path / "results").glob("*.png")) == sorted(
        p.name for p in (REPO / "docs" / "results").glob("*.png"))


def _load_report():
    spec = importlib.util.spec_from_file_location("report", REPO / "experiments" / "report.py")
    report = importlib.util.module_from_spec(spec)
    sys.modules["report"] = report  # dataclasses look their module up while the class is created
    spec.loader.exec_module(report)
    return report


def test_indirect_test_rows_say_whose_weights_a_best_validation_test_scored() -> None:
    report = _load_report()
    metrics = {"test/accuracy": [(1200, 0.5), (3000, 0.9)], "test/loss": [(1200, 1.5), (3000, 0.4)],
               "train/accuracy": [(s, 0.6) for s in range(0, 3000, 10)]}
    run = report.Run("indirect-pope", "FINISHED", {}, metrics)
    logs = {"indirect-pope.first-call": report.Log(None, 1200, 60, None),
            "indirect-pope": report.Log(None, 3000, 120, 2000)}  # the second call tested best.ckpt of step 2000
    session = report.Session(Path("r"), Path("p"), {"indirect-pope": run}, logs, [], [], [])
    rows = report.indirect_test_rows(session, {"PoPE": run})
    assert [row[2] for row in rows] == ["1,200", "3,000 (weights of step 2,000, the best val loss)"]
    assert [row[3] for row in rows] == ["50.0 %", "90.0 %"]


def test_a_later_attempt_names_the_settings_it_changed_beyond_the_schedule() -> None:
    report = _load_report()
    first = report.Run("indirect-pope", "FINISHED", {"optim.lr": "4e-4", "optim.weight_decay": "0.01",
                                                     "seed": "0"}, {})
    same = report.Run("indirect-pope", "FINISHED", {"optim.lr": "2e-4", "optim.weight_decay": "0.01", "seed": "0",
                                                    "trainer.compile_mode": "default"}, {})
    assert report.other_differences(first, same) == "everything else as in attempt 1"
    changed = report.Run("indirect-pope", "FINISHED", {"optim.lr": "2e-4", "optim.weight_decay": "0.1",
                                                       "seed": "0"}, {})
    assert report.other_differences(first, changed) == "except optim.weight_decay=0.1 (attempt 1: 0.01)"
