"""`pope-lm eval-zeroshot`: lm-evaluation-harness end to end on CPU, on an exported tiny model, with tasks
defined from local files (a YAML multiple-choice task, and the CBT task definition on CBT-format records)."""

import json

import pytest
from mlflow import MlflowClient

from pope_lm.cli import main
from pope_lm.zeroshot import ZeroShotSettings, cbt_task, expand_tasks, run_lm_eval, summarize

pytest.importorskip("lm_eval.models.huggingface", reason="lm-evaluation-harness with its hf extra is not installed "
                                                          "(pip install 'pope-lm[eval]')")

TASK_YAML = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
DOCS = [
    {"context": "The cat sat on the", "choices": [" mat", " moon", " idea"], "label": 0},
    {"context": "One, two, three,", "choices": [" four", " blue", " seven"], "label": 0},
    {"context": "Paris is the capital of", "choices": [" France", " Spain", " cheese"], "label": 0},
    {"context": "She opened the", "choices": [" door", " sky", " seven"], "label": 0},
]
CBT_DOCS = [
    {"sentences": ["The king had a cat .", "`` It is black , '' he said ."], "question": "The king loved his XXXXX .",
     "options": ["cat", "dog", "moon"], "answer": "cat"},
    {"sentences": ["Mary went home .", "She was n't happy ."], "question": "XXXXX slept early .",
     "options": ["John", "Mary", "Bob"], "answer": "Mary"},
]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("zeroshot") / "model"
    assert main(["export-hf", str(tiny_checkpoint), str(out)]) == 0
    return out


@pytest.fixture
def local_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "local_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "local_mc.yaml").write_text(TASK_YAML.format(data=data))
    cbt = tmp_path / "cbt.jsonl"
    cbt.write_text("".join(json.dumps(d) + "\n" for d in CBT_DOCS))
    return tmp_path, cbt


def test_cli_runs_a_local_task_end_to_end_and_logs_to_mlflow(exported, local_tasks, tmp_path, capsys):
    tasks_dir, _ = local_tasks
    db = tmp_path / "mlflow.db"
    argv = ["eval-zeroshot", str(exported), "--tasks", "local_mc", "--include-path", str(tasks_dir),
            "--device", "cpu", "--batch-size", "2", "--out", str(tmp_path / "res"), "--tracking-uri", f"sqlite:///{db}"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "local_mc" in table and "| average |" in table
    record = json.loads((tmp_path / "res" / "results.json").read_text())
    accuracy = record["results"]["local_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and record["summary"]["average"] == accuracy
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("pope-lm-zeroshot").experiment_id])
    assert run.data.metrics["zeroshot/local_mc"] == pytest.approx(accuracy)


def test_cbt_is_scored_on_the_whole_filled_in_passage(exported, local_tasks):
    _, cbt = local_tasks
    task = cbt_task("CN", dataset_path="json", dataset_kwargs={"data_files": {"test": str(cbt)}})
    filled = task["doc_to_choice"](CBT_DOCS[1])
    assert filled[1] == "Passage: Mary went home. She wasn't happy.\nQuestion: Mary slept early."
    assert task["doc_to_target"](CBT_DOCS[1]) == 1
    results = run_lm_eval(exported, [task], ZeroShotSettings(device="cpu", batch_size=2))
    summary = summarize(results, ["cbt"])
    assert results["results"]["cbt_cn"]["sample_len"] == len(CBT_DOCS)
    assert summary["cbt"] == summary["cbt_cn"] == summary["average"]


def test_paper_defaults_expand_cbt_and_unknown_tasks_are_one_line_errors(exported, capsys):
    expanded = expand_tasks(["lambada_openai", "cbt", "piqa"])
    assert [t if isinstance(t, str) else t["task"] for t in expanded] == ["lambada_openai", "cbt_cn", "cbt_ne", "piqa"]
    assert main(["eval-zeroshot", str(exported), "--tasks", "no_such_task", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown lm-eval task(s): no_such_task")
