"""Loss curves of finished runs side by side, read from each run's MLflow store (`runs/<name>/mlflow.db`).

For A/B checks of training quality: the same recipe and seed with one setting changed, against the same recipe
with another seed (the noise floor), e.g. in `benchmarks/residual_precision.sh`:

    python benchmarks/compare_runs.py runs/res-fp32 runs/res-bf16 runs/res-fp32-seed2 --metric val/loss

With --pairs the runs come as (baseline, treatment) pairs, one pair per seed, and the table shows each pair's
difference, their mean and its standard error, beside the baselines' spread across seeds (the noise floor):

    python benchmarks/compare_runs.py --pairs runs/fp32-s1 runs/bf16-s1 runs/fp32-s2 runs/bf16-s2 --metric val/loss
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
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


def print_side_by_side(runs: list[Path], histories: list[dict[int, float]], metric: str) -> None:
    steps = sorted(set().union(*histories))
    names = [run.name for run in runs]
    print(f"{metric} by step; columns after the first also show their difference to it\n")
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


def print_paired(runs: list[Path], histories: list[dict[int, float]], metric: str) -> None:
    """Per step that every run logged: each pair's treatment minus baseline, the mean difference with its standard
    error, and the standard deviation of the baselines across pairs (what a change of seed alone moves)."""
    pairs = [(runs[i].name, runs[i + 1].name) for i in range(0, len(runs), 2)]
    baselines, treatments = histories[0::2], histories[1::2]
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    print(f"{metric} by step: treatment minus baseline per pair, their mean, and the baselines' spread\n")
    print("| step | " + " | ".join(f"{t} - {b}" for b, t in pairs) + " | mean (std. error) | baselines' std |")
    print("|---" * (len(pairs) + 3) + "|")
    for step in steps:
        differences = [t[step] - b[step] for b, t in zip(baselines, treatments, strict=True)]
        mean = statistics.fmean(differences)
        error = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
        spread = statistics.stdev(b[step] for b in baselines) if len(baselines) > 1 else float("nan")
        cells = " | ".join(f"{d:+.4f}" for d in differences)
        print(f"| {step} | {cells} | {mean:+.4f} ({error:.4f}) | {spread:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--metric", default="val/loss")
    parser.add_argument("--pairs", action="store_true", help="runs are (baseline, treatment) pairs, one per seed")
    args = parser.parse_args()
    if args.pairs and len(args.runs) % 2:
        parser.error(f"--pairs needs an even number of runs, got {len(args.runs)}")
    histories = [metric_history(run, args.metric) for run in args.runs]
    (print_paired if args.pairs else print_side_by_side)(args.runs, histories, args.metric)


if __name__ == "__main__":
    main()
