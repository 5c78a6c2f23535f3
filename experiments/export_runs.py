"""Export the MLflow record of finished runs to JSON: the committed form of a GPU session's results.

A run directory of `pope-lm train` holds its MLflow store (mlflow.db). For each directory this writes
`<out>/<run dir name>.json` with the run's params and the full history of every metric, which
experiments/report.py turns into the tables and plots of docs/results.md.

    python experiments/export_runs.py OUT RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mlflow import MlflowClient


def export_run_dir(run_dir: Path, experiment: str = "pope-lm") -> dict[str, Any]:
    client = MlflowClient(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    if len(runs) != 1:
        raise SystemExit(f"error: {run_dir} holds {len(runs)} MLflow runs in experiment '{experiment}', expected 1")
    run = runs[0]
    metrics = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
    return {"run": run_dir.name, "status": run.info.status, "params": run.data.params, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run_dir in args.run_dirs:
        if not (run_dir / "mlflow.db").exists():
            print(f"skipped {run_dir}: no mlflow.db (the run did not start)")
            continue
        record = export_run_dir(run_dir)
        (args.out / f"{run_dir.name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"exported {run_dir.name}: {record['status']}, {len(record['metrics'])} metrics")


if __name__ == "__main__":
    main()
