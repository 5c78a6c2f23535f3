"""The GPU benchmarks' host-side helpers, on the CPU: train_throughput.py's per-kernel profile summary, the
Lightning variant's step clock and its recipes with overrides, compare_runs.py's reading of MLflow stores and its
paired table, gelu_epilogue.py's fused kernels (interpreted), hopper_check.py's switch between this checkout's Hopper
kernels, a revision's and Triton's, the tile counts and the fit of hopper_program_cost.py's per-program cost, and
ncu_source_summary.py's reading of ncu's source page."""

from __future__ import annotations

import importlib.util
import os
import re
import sqlite3
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _kernel(name: str, us: float, device_type=torch.autograd.DeviceType.CUDA) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_time_total=us, device_type=device_type)


def test_kernel_profile_sums_each_steps_gpu_time_by_part_and_lists_the_kernels_above_a_share(capsys) -> None:
    profile = _load("train_throughput").print_kernel_profile
    events = [_kernel("_dkdv_kernel", 800.0), _kernel("_dkdv_kernel", 800.0), _kernel("_softplus_kernel", 100.0),
              _kernel("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 3000.0),
              _kernel("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 500.0),
              _kernel("triton_poi_fused_gelu_4", 200.0), _kernel("multi_tensor_apply_kernel<FusedOptimizer>", 400.0),
              _kernel("memcpy", 100.0), _kernel("aten::mm", 9999.0, torch.autograd.DeviceType.CPU)]
    profile(events, steps=2, step_seconds=0.004, min_share=0.2)  # 1.5 and 0.8 of 2.95 ms; the next, 0.25
    summary, first, second = capsys.readouterr().out.splitlines()
    assert summary.startswith("  GPU busy 2.95 ms per step of 4.00 ms wall; by part: matmul 1.50, pope attention 0.85")
    assert "sdpa attention 0.25" in summary and "optimizer 0.20" in summary
    assert "compiled elementwise 0.10" in summary and "other 0.05" in summary
    assert "1.500 ms" in first and "nvjet" in first
    assert "0.800 ms     1 x  _dkdv_kernel" in second


def test_throughput_recipes_take_comma_separated_overrides_after_a_colon(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    load_recipe = _load("train_throughput").load_recipe
    assert not load_recipe("124m").model.fp32_residual
    cfg = load_recipe("124m:model.fp32_residual=true,trainer.micro_batch_size=8")
    assert cfg.model.fp32_residual and cfg.trainer.micro_batch_size == 8
    with pytest.raises(SystemExit, match=re.escape("--recipes 124m:model.bogus=1: unknown key 'model.bogus'")):
        load_recipe("124m:model.bogus=1")


def test_compare_runs_reads_a_metrics_history_from_the_runs_mlflow_store(tmp_path) -> None:
    compare_runs = _load("compare_runs")
    run = tmp_path / "run"
    run.mkdir()
    with sqlite3.connect(run / "mlflow.db") as db:
        db.execute("CREATE TABLE metrics (key TEXT, value REAL, timestamp INTEGER, step INTEGER)")
        db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)",
                       [("val/loss", 5.0, 1, 0), ("train/loss", 9.0, 2, 0), ("val/loss", 4.0, 3, 40),
                        ("val/loss", 3.5, 4, 40)])  # two values at one step: the later one counts
    assert compare_runs.metric_history(run, "val/loss") == {0: 5.0, 40: 3.5}
    with pytest.raises(SystemExit, match="no values of 'test/loss'"):
        compare_runs.metric_history(run, "test/loss")
    with pytest.raises(SystemExit, match=r"no mlflow\.db"):
        compare_runs.metric_history(tmp_path, "val/loss")


def test_compare_runs_pairs_show_each_seeds_difference_their_mean_and_the_baselines_spread(capsys) -> None:
    compare_runs = _load("compare_runs")
    runs = [Path(name) for name in ("fp32-s1", "bf16-s1", "fp32-s2", "bf16-s2")]
    histories = [{0: 10.0, 50: 4.00}, {0: 10.0, 50: 4.03}, {0: 10.0, 50: 4.10}, {0: 10.0, 50: 4.09, 60: 3.9}]
    compare_runs.print_paired(runs, histories, "val/loss")
    lines = capsys.readouterr().out.splitlines()
    assert "| bf16-s1 - fp32-s1 | bf16-s2 - fp32-s2 | mean (std. error) | baselines' std |" in lines[2]
    assert lines[4] == "| 0 | +0.0000 | +0.0000 | +0.0000 (0.0000) | 0.0000 |"
    assert lines[5] == "| 50 | +0.0300 | -0.0100 | +0.0100 (0.0200) | 0.0707 |"  # step 60: not in every run
    assert len(lines) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_epilogue_matmuls_match_torch(dtype, capsys) -> None:
    _load("gelu_epilogue").check(70, 48, dtype, "cpu")  # 70 x 192 outputs: partial tiles on both sides
    assert capsys.readouterr().out.count("relative error") == 3


def test_lightning_step_clock_stops_before_the_profiled_steps_start(monkeypatch) -> None:
    throughput = _load("train_throughput")
    profiled: list[str] = []

    class Profiler:  # stands in for torch.profiler.profile, which needs a GPU here
        def __init__(self, activities: list) -> None:
            profiled.append("created")

        def __enter__(self) -> Profiler:
            return self

        def __exit__(self, *exc: object) -> None:
            profiled.append("stopped")

        def events(self) -> list:
            return []

    monkeypatch.setattr(throughput.torch.profiler, "profile", Profiler)
    clock = iter([10.0, 14.0, 99.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    timer = throughput._StepTimer(warmup=2, steps=4, profile_steps=3)
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    for step in range(2 + 4 + 3):
        trainer.global_step = step
        timer.on_train_batch_start(trainer)
    timer.on_train_end(trainer)
    assert (timer.start, timer.end, timer.seconds_per_step) == (10.0, 14.0, 1.0)  # the profiled steps are not timed
    assert profiled == ["created", "stopped"]


def test_hopper_check_routes_attention_through_a_revisions_kernels_then_restores_the_checkouts(
        monkeypatch) -> None:
    check = _load("hopper_check")
    monkeypatch.delenv("POPE_LM_GLUON", raising=False)
    checkout = check.flash.flash_hopper
    revision = check.load_revision(REPO / "kernels" / "flash_hopper.py")
    assert revision is not checkout and revision.CONFIGS.keys() == checkout.CONFIGS.keys()
    with check.hopper_kernels(revision):
        assert check.flash.flash_hopper is revision and os.environ["POPE_LM_GLUON"] == "1"
    assert check.flash.flash_hopper is checkout and "POPE_LM_GLUON" not in os.environ
    with check.hopper_kernels(None):  # Triton's kernels everywhere
        assert os.environ["POPE_LM_GLUON"] == "0"
    assert "POPE_LM_GLUON" not in os.environ


def test_program_cost_counts_the_streamed_work_of_each_causal_pass_in_units_of_64_keys_and_32_queries() -> None:
    tiles = _load("hopper_program_cost").tiles
    # 8 programs of 128 rows: the forward's stream 2, 4, .., 16 units of 64 keys; dk/dv's 32, 28, .., 4 units of 32
    # queries (its kernel's 64-query tiles hold two each)
    assert tiles(1024) == {"fwd": 72, "dq": 72, "dkdv": 144, "programs": 8}
    assert tiles(200) == {"fwd": 2 + 4, "dq": 6, "dkdv": 7 + 3, "programs": 2}  # the last block is cut at N


def test_program_cost_fit_recovers_the_per_tile_and_per_program_cost() -> None:
    cost = _load("hopper_program_cost")
    sms, c_tile, c_fixed = 4, 1.5, 3.0
    rows = []
    for n in (1024, 2048, 4096):
        counts = {name: 6 * c for name, c in cost.tiles(n).items()}
        rows.append((counts, {"fwd": (counts["fwd"] * c_tile + counts["programs"] * c_fixed) / sms}))
    line = cost.fit("fwd", rows, sms)
    assert line.startswith("fwd: per tile 1.500 us, per program 3.00 us; fit residuals ")
    residuals = line.split("fit residuals ")[1].split(";")[0].split()
    assert [abs(float(r)) for r in residuals] == [0.0, 0.0, 0.0]
    share = 6 * 8 / sms * c_fixed / rows[0][1]["fwd"]  # the programs' part of the first shape's time
    assert line.endswith(f"per-program share at N = {cost.SHAPES[0][2]}: {share:.0%}")


# two kernels as `ncu --page source --csv` prints them (columns cut to those the summary reads, one stall reason)
NCU_SOURCE_CSV = """"Kernel Name","_fwd_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_barrier","stall_long_sb",\
"stall_barrier (Not Issued)"
"0x10","LDC R1, c[0x0][0x28]","10","120","0","10","0"
"0x20","MUFU.EX2 R3, R4","30","40","30","0","0"
"0x30","@!P0  BRA 0x40","60","1080","0","60","0"
"Kernel Name","_dq_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_barrier","stall_long_sb",\
"stall_barrier (Not Issued)"
"0x10","LDC R1, c[0x0][0x28]","1","12","0","1","0"
"""


def test_ncu_source_summary_splits_samples_between_per_program_code_and_loops() -> None:
    ncu = _load("ncu_source_summary")
    fwd, dq = ncu.parse(NCU_SOURCE_CSV)
    assert (fwd.name, dq.name, fwd.warp_launches()) == ("_fwd_kernel", "_dq_kernel", 120)
    assert fwd.instructions[2].opcode == "BRA" and fwd.instructions[2].stalls == {"barrier": 0, "long_sb": 60}
    text = ncu.summary(fwd, top=1).splitlines()
    # the first two instructions run at most once per warp launch (120): 40 of 100 samples; the branch loops
    assert text[1].startswith("  per program: 40% of samples; stalls: barrier 75%, long_sb 25%")
    assert text[2] == "    by opcode: MUFU 75%, LDC 25%"
    assert text[3].startswith("  loops: 60% of samples; stalls: long_sb 100%")
    assert "60.0%" in text[5] and "BRA" in text[5]
