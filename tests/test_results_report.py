"""docs/results.md is generated: it must be exactly what experiments/report.py makes of the committed runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
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


def _session(report, results: str, logs: dict, card: list[str]):
    runs = {name: report.Run(name, "FINISHED", {}, {}) for name in ("indirect-pope", "indirect-rope")
            if any(log.startswith(name) for log in logs)}
    return report.Session(Path(results), Path("p"), runs, logs, [], [], card)


def test_a_run_resumed_twice_reports_each_calls_share_of_the_cumulative_time_limit() -> None:
    report = _load_report()
    log = report.Log
    card = ["NVIDIA H200, 580", "NVIDIA H200, 580", "torch 2.11", "Thu Nov 26 09:32:07 AM UTC 2026"]
    # RoPE reached max_steps in the third call, so only PoPE's log tells that call's limit (24:10 in all)
    session = _session(report, "a6", {
        "indirect-pope.first-call": log(None, 100, 470, None), "indirect-pope.second-call": log(None, 200, 940, None),
        "indirect-pope": log(None, 300, 1450, None), "indirect-rope.first-call": log(None, 150, 470, None),
        "indirect-rope.second-call": log(None, 250, 940, None), "indirect-rope": log(None, 400, None, None)}, card)
    # attempt 8 ran alone and reached max_steps in its third call: that limit comes from the same machine's attempt 6
    alone = _session(report, "a8", {
        "indirect-pope.first-call": log(None, 100, 470, None), "indirect-pope.second-call": log(None, 200, 940, None),
        "indirect-pope": log(None, 300, None, None)}, [*card[:-1], "Thu Nov 26 09:33:27 AM UTC 2026"])
    both = report.Report([session, alone])
    assert session.call_logs("indirect-rope") == [
        "indirect-rope.first-call", "indirect-rope.second-call", "indirect-rope"]
    assert report.wall_time(both, session, "indirect-pope") == "7:50 + 7:50 + 8:30"
    assert report.wall_time(both, session, "indirect-rope") == "7:50 + 7:50 + < 8:30"
    assert report.wall_time(both, alone, "indirect-pope") == "7:50 + 7:50 + < 8:30"


def test_folders_from_one_machine_count_as_one_session_and_others_do_not() -> None:
    report = _load_report()
    log = report.Log(None, 100, 470, None)
    h100 = ["NVIDIA H100 80GB HBM3, 580", "torch 2.11"]
    h200x4 = ["NVIDIA H200, 580"] * 4 + ["torch 2.11"]
    folders = [_session(report, name, {"indirect-pope": log}, [*card, date]) for name, card, date in (
        ("a5", h100, "Thu Nov 26 08:01:07 AM UTC 2026"), ("a6", h200x4, "Thu Nov 26 09:32:07 AM UTC 2026"),
        ("a7", h200x4, "Thu Nov 26 09:36:34 AM UTC 2026"), ("a8", h200x4, "Thu Nov 26 09:33:27 AM UTC 2026"),
        ("a9", h200x4, "Thu Nov 26 11:40:00 AM UTC 2026"))]
    both = report.Report(folders)
    assert [both.session_number(s) for s in folders] == [1, 2, 2, 2, 3]
    assert [s.gpus for s in folders] == [1, 4, 4, 4, 4]


def test_a_kernel_run_is_labelled_by_whether_it_started_before_the_backward_fix() -> None:
    report = _load_report()
    fix = report.KERNEL_BACKWARD_FIX
    pope = report.Run("indirect-pope", "FINISHED", {"model.position": "pope"}, {})
    named = report.Run("indirect-pope", "FINISHED", {"model.position": "pope", "model.attention_backend": "triton"}, {})
    reference = report.Run("indirect-pope", "FINISHED", {"model.position": "pope",
                                                         "model.attention_backend": "reference"}, {})
    rope = report.Run("indirect-rope", "FINISHED", {"model.position": "rope"}, {})

    def started(at):  # the first call's log carries the start; the last call's (resumed) has none
        return _session(report, "a", {"indirect-pope.first-call": report.Log(at, 100, 470, None),
                                      "indirect-pope": report.Log(None, 200, 940, None)}, [])

    before, after = started(fix - timedelta(hours=1)), started(fix + timedelta(hours=1))
    assert report.backend(before, pope) == report.FAULTY_KERNEL
    assert report.backend(after, named) == report.FIXED_KERNEL
    assert report.backend(started(None), pope) == report.FAULTY_KERNEL  # undated: not claimed to be fixed
    assert report.backend(after, reference) == "reference (torch)"
    assert report.backend(after, rope) == "SDPA"


def test_a_last_call_that_every_run_ended_at_max_steps_has_no_time_limit_but_an_earlier_one_must() -> None:
    report = _load_report()
    log = report.Log
    card = ["NVIDIA H100 80GB HBM3, 580", "torch 2.11", "Thu Nov 26 01:04:12 PM UTC 2026"]
    ran_out = _session(report, "a11", {
        "indirect-pope.first-call": log(None, 100, 470, None), "indirect-pope.second-call": log(None, 200, 940, None),
        "indirect-pope": log(None, 300, None, None)}, card)
    assert report.Report([ran_out]).indirect_time_limits(ran_out) == [470, 940, None]
    assert report.wall_time(report.Report([ran_out]), ran_out, "indirect-pope") == "7:50 + 7:50 + -"
    unknown = _session(report, "a12", {
        "indirect-pope.first-call": log(None, 100, 470, None), "indirect-pope.second-call": log(None, 200, None, None),
        "indirect-pope": log(None, 300, 1450, None)}, card)
    with pytest.raises(SystemExit, match=r"says when trainer\.max_time stopped it"):
        report.Report([unknown]).indirect_time_limits(unknown)


def test_a_further_seed_of_an_attempt_is_reported_beside_its_first_run() -> None:
    report = _load_report()
    test = {"test/accuracy": [(60000, 0.095)]}
    runs = {"indirect-pope": report.Run("indirect-pope", "FINISHED", {"model.position": "pope", "seed": "1337"},
                                        {"test/accuracy": [(60000, 0.182)]}),
            "indirect-rope": report.Run("indirect-rope", "FINISHED", {"model.position": "rope", "seed": "1337"}, test),
            "indirect-rope-seed1": report.Run("indirect-rope-seed1", "FINISHED",
                                              {"model.position": "rope", "seed": "1"},
                                              {"test/accuracy": [(60000, 0.134)]})}
    session = report.Session(Path("a11"), Path("p"), runs, {}, [], [], [])
    assert report.indirect_runs(session) == {"PoPE": "indirect-pope", "RoPE": "indirect-rope"}
    assert list(report.seed_runs(session)) == ["RoPE (seed 1)"]
    assert report.with_seeds(session, "RoPE") == "9.5 % (seed 1: 13.4 %)"
    assert report.with_seeds(session, "PoPE") == "18.2 %"
    assert report.attempt_label((11, "RoPE (seed 1)")) == "attempt 11, seed 1"
    assert report.attempt_label((11, "RoPE")) == "attempt 11"


def test_a_length_extrapolation_set_at_a_known_shape_is_a_seed_and_at_a_new_shape_a_set_of_its_own() -> None:
    report = _load_report()

    def extrapolation(results: str, layers: str, seed: str):
        pope = report.Run("extrapolation-pope", "FINISHED", {"model.n_layer": layers, "model.d_model": "384",
                                                             "seed": seed}, {})
        rows = [{"model": "PoPE", "length": "1024", "ppl": "60"}]
        return report.Session(Path(results), Path("p"), {"extrapolation-pope": pope}, {}, rows, [], [])

    small, large = extrapolation("s", "6", "1337"), extrapolation("l", "12", "1337")
    again = extrapolation("a", "6", "1")
    both = report.Report([small, large, again])
    assert [s.results.name for s in both.extrapolations] == ["s", "l"]
    assert [s.results.name for s in both.extrapolation_seeds(small)] == ["a"]
    assert both.extrapolation_seeds(large) == []


def test_jsb_seeds_pair_the_newest_recipes_runs_with_further_seeds_from_any_session() -> None:
    report = _load_report()

    def run(name: str, position: str, seed: str):
        return report.Run(name, "FINISHED", {"model.position": position, "seed": seed}, {})

    newest = report.Session(Path("n"), Path("p"), {"jsb-pope": run("jsb-pope", "pope", "1337"),
                                                   "jsb-rope": run("jsb-rope", "rope", "1337")}, {}, [], [], [])
    seeds = report.Session(Path("s"), Path("p"), {name: run(name, position, seed) for name, position, seed in (
        ("jsb-pope-seed1", "pope", "1"), ("jsb-rope-seed1", "rope", "1"), ("jsb-pope-seed2", "pope", "2"),
        ("jsb-rope-seed2", "rope", "2"))}, {}, [], [], [])
    pairs = report.Report([newest, seeds]).jsb_seeds()
    assert list(pairs) == ["1337", "1", "2"]
    assert pairs["1337"][0] is newest and pairs["2"][0] is seeds
    assert {m: r.name for m, r in pairs["1"][1].items()} == {"PoPE": "jsb-pope-seed1", "RoPE": "jsb-rope-seed1"}
