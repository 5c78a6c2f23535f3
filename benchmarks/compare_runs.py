"""Loss curves of finished runs side by side, read from each run's MLflow store (`runs/<name>/mlflow.db`).

For A/B checks of training quality: the same recipe and seed with one setting changed, against the same recipe
with another seed (the noise floor), e.g. in `benchmarks/residual_precision.sh`:

    python benchmarks/compare_runs.py runs/res-fp32 runs/res-bf16 runs/res-fp32-seed2 --metric val/loss
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path


def metric_history(run_dir: Path, metric: str) -> dict[int, float]:
    """{step: value} of `metric` in the run's MLflow store (the last value logged at a step wins)."""
    store = run_dir / "mlflow.db"
    if not store.is_file():
        raise SystemExit(f"{run_dir}: no mlflow.db (not a pope-lm run directory, or the run logged elsewhere)")
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT step, value FROM metrics WHERE key = ? ORDER BY step, timestamp", (metric,))
        history = {int(step): float(value) for step, value in rows}
    if not history:
        raise SystemExit(f"{run_dir}: no values of {metric!r} in {store}")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--metric", default="val/loss")
    args = parser.parse_args()
    histories = [metric_history(run, args.metric) for run in args.runs]
    steps = sorted(set().union(*histories))
    names = [run.name for run in args.runs]
    print(f"{args.metric} by step; columns after the first also show their difference to it\n")
    print("| step | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for step in steps:
        reference = histories[0].get(step)
        cells = []
        for i, history in enumerate(histories):
            value = history.get(step)
            if value is None:
                cells.append("-")
            elif i == 0 or reference is None:
                cells.append(f"{value:.4f}")
            else:
                cells.append(f"{value:.4f} ({value - reference:+.4f})")
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
