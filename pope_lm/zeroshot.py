"""`pope-lm eval-zeroshot OUT`: the paper's zero-shot tasks through lm-evaluation-harness on an exported model.

The paper scores LAMBADA (OpenAI), BLiMP, CBT, HellaSwag, PIQA and ARC-Easy "as lm-evaluation-harness does".
The harness runs the `export-hf` folder as any Hugging Face causal LM (`hf` backend, trust_remote_code).
Current harness releases no longer ship CBT, so it is defined here as the harness's own 0.3 version did it:
each of the ten candidate words is put in place of XXXXX in the question, and the candidate whose whole
passage + question is likeliest wins (Hill et al. 2016, section 4.4); `cbt` runs both the common-noun (CN) and
named-entity (NE) sets and reports their mean. The summary's `average` is the mean accuracy of the tasks run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pope_lm.config import ConfigError

log = logging.getLogger("pope_lm")

PAPER_TASKS = ("lambada_openai", "blimp", "cbt", "hellaswag", "piqa", "arc_easy")
CBT_SUBSETS = {"cbt_cn": "CN", "cbt_ne": "NE"}
CBT_DATASET = "cam-cst/cbt"


@dataclass
class ZeroShotSettings:
    tasks: Sequence[str] = PAPER_TASKS
    out: str | None = None  # None: a folder beside the model's, <model dir>-zeroshot (the export stays as written)
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    limit: float | None = None  # examples per task (a fraction when < 1), for quick checks
    include_path: str | None = None  # extra task YAML files
    tracking_uri: str | None = None
    experiment: str = "pope-lm-zeroshot"


def cbt_task(subset: str, dataset_path: str = CBT_DATASET, dataset_kwargs: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The lm-eval task config of one CBT set ('CN' or 'NE'); the dataset arguments let tests use local files."""
    config: dict[str, Any] = {
        "task": f"cbt_{subset.lower()}",
        "dataset_path": dataset_path,
        "dataset_name": subset if dataset_path == CBT_DATASET else None,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": _no_context,
        "doc_to_choice": _cbt_filled_passages,
        "doc_to_target": _cbt_answer_index,
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    if dataset_kwargs:
        config["dataset_kwargs"] = dataset_kwargs
    return config


def _no_context(doc: dict[str, Any]) -> str:
    return ""  # the whole filled-in passage is the scored continuation


def _cbt_filled_passages(doc: dict[str, Any]) -> list[str]:
    text = _detokenize("Passage: " + " ".join(doc["sentences"]) + "\nQuestion: " + doc["question"])
    return [text.replace("XXXXX", option) for option in doc["options"]]


def _cbt_answer_index(doc: dict[str, Any]) -> int:
    return list(doc["options"]).index(doc["answer"])


def _detokenize(text: str) -> str:
    """Undo CBT's PTB-style tokenization (the harness 0.3 rules), so the LM scores ordinary text."""
    text = text.replace(" '", "'").replace(" \n", "\n").replace("\n ", "\n").replace(" n't", "n't")
    text = text.replace("`` ", '"').replace("''", '"')
    return re.sub(r" (?=[,.;:!?])", "", text)


def expand_tasks(names: Sequence[str]) -> list[str | dict[str, Any]]:
    """Task names to what lm-eval takes: 'cbt' becomes the two CBT configs, other names stay."""
    tasks: list[str | dict[str, Any]] = []
    for name in names:
        if name == "cbt":
            tasks.extend(cbt_task(subset) for subset in CBT_SUBSETS.values())
        elif name in CBT_SUBSETS:
            tasks.append(cbt_task(CBT_SUBSETS[name]))
        else:
            tasks.append(name)
    return tasks


def run_lm_eval(model_dir: str | Path, tasks: Sequence[str | dict[str, Any]], settings: ZeroShotSettings
                ) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on an exported folder; returns its results dictionary."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'pope-lm[eval]'") from None
    import torch

    manager = TaskManager(include_path=settings.include_path) if settings.include_path else TaskManager()
    unknown = [t for t in tasks if isinstance(t, str) and t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm-eval ls tasks`)")
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if settings.device == "auto" else settings.device
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if settings.dtype == "auto" else settings.dtype
    model_args = {"pretrained": str(model_dir), "trust_remote_code": True, "dtype": dtype}
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks),
                                      batch_size=settings.batch_size, device=device, limit=settings.limit,
                                      task_manager=manager, log_samples=False)
    if results is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")
    return results


def summarize(results: dict[str, Any], requested: Sequence[str]) -> dict[str, float]:
    """Accuracy per task (normalised accuracy too where reported), CBT's mean over CN and NE, and the average
    accuracy over the `requested` task names (a group such as blimp counts once, with its aggregate)."""
    summary: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for metric in ("acc", "acc_norm"):
            value = metrics.get(f"{metric},none")
            if isinstance(value, int | float):
                summary[task if metric == "acc" else f"{task}/acc_norm"] = float(value)
    cbt = [summary[t] for t in CBT_SUBSETS if t in summary]
    if cbt:
        summary["cbt"] = sum(cbt) / len(cbt)
    scored = [summary[name] for name in requested if name in summary]
    if scored:
        summary["average"] = sum(scored) / len(scored)
    return summary


def eval_zeroshot(model_dir: str | Path, settings: ZeroShotSettings) -> str:
    """Run the tasks, write results.json and results.md, log to MLflow when asked; returns the printed table."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not an exported model folder (no config.json); run `pope-lm export-hf`")
    results = run_lm_eval(model_dir, expand_tasks(settings.tasks), settings)
    from lm_eval.utils import make_table

    summary = summarize(results, settings.tasks)
    table = make_table(results)
    lines = [f"| {name} | {value:.4f} |" for name, value in summary.items()]
    text = table + "\n| summary | accuracy |\n|---|---|\n" + "\n".join(lines) + "\n"
    out = Path(settings.out) if settings.out else model_dir.with_name(model_dir.name + "-zeroshot")
    out.mkdir(parents=True, exist_ok=True)
    record = {"summary": summary, "results": results["results"], "config": {"tasks": list(settings.tasks),
              "limit": settings.limit, "model": str(model_dir)}}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "results.md").write_text(text)
    if settings.tracking_uri:
        _log_to_mlflow(summary, out, model_dir, settings)
    return text


def _log_to_mlflow(summary: dict[str, float], out: Path, model_dir: Path, settings: ZeroShotSettings) -> None:
    from mlflow import MlflowClient

    from pope_lm.evaluation import experiment_id_for

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    experiment_id = experiment_id_for(client, settings.experiment, settings.tracking_uri)
    run_id = client.create_run(experiment_id, run_name=f"zeroshot {model_dir.name}",
                               tags={"pope_lm.task": "eval-zeroshot"}).info.run_id
    client.log_param(run_id, "model", str(model_dir.resolve()))
    client.log_param(run_id, "tasks", ",".join(settings.tasks))
    client.log_param(run_id, "limit", str(settings.limit))
    for name, value in summary.items():
        client.log_metric(run_id, f"zeroshot/{name}", value)
    for name in ("results.json", "results.md"):
        client.log_artifact(run_id, str(out / name))
    client.set_terminated(run_id)
    log.info("MLflow: run %s in %s", run_id, settings.tracking_uri)
