"""docs/results.md is generated: it must be exactly what experiments/report.py makes of the committed runs."""

from __future__ import annotations

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
