"""Scale-out pieces: the DeepSpeed config generated from a recipe, strategy and launcher checks, stopping on
SIGUSR1, ZeRO checkpoint directories, and real DeepSpeed ZeRO-2/3 training on CPU (two ranks, gloo).

Lightning's DeepSpeedStrategy refuses the CPU, so DeepSpeed runs twice here: driven directly
(tests/deepspeed_worker.py: ZeRO-2/3, consolidation, resume) and through `pope-lm train` with Lightning's
CUDA checks patched out (tests/lightning_deepspeed_cpu.py: ZeRO-2/3 against DDP, checkpoint directories,
resume=auto).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch_helpers import FAST, REPO, TINY, checkpoint_steps, launcher_env, mlflow_run_ids
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DeepSpeedStrategy
from safetensors import safe_open
from safetensors.torch import load_file

from pope_lm.checkpointing import PeriodicCheckpoint, checkpoint_name, checkpoint_state, load_model
from pope_lm.cli import main
from pope_lm.config import ConfigError, RunConfig, load_config
from pope_lm.lit_module import CONFIG_KEY
from pope_lm.strategy import (
    StopOnSignal,
    build_strategy,
    check_launcher_geometry,
    cluster_plugins,
    deepspeed_config,
    resolve_strategy,
)
from pope_lm.tracking import RUN_ID_KEY

DEEPSPEED = ("trainer.strategy=deepspeed", "trainer.devices=2", "trainer.micro_batch_size=2")


def _cfg(*overrides: str) -> RunConfig:
    return load_config(TINY, list(overrides))


def test_generated_deepspeed_config_follows_the_recipe() -> None:
    cfg = _cfg(*DEEPSPEED, "trainer.zero_stage=3", "trainer.global_batch_size=32", "trainer.micro_batch_size=4",
               "optim.grad_clip=0.5")
    config = deepspeed_config(cfg, "bf16-mixed")
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (32, 4)
    assert config["gradient_accumulation_steps"] == 4  # 32 / (4 x 2 ranks)
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in config["zero_optimization"] and "offload_param" not in config["zero_optimization"]


def test_zero3_buffers_scale_with_the_model_and_user_json_overrides_them(tmp_path: Path) -> None:
    cfg = _cfg(*DEEPSPEED, "trainer.zero_stage=3", "model.d_model=128", "model.n_head=4")
    zero = deepspeed_config(cfg, "bf16-mixed")["zero_optimization"]
    assert zero["reduce_bucket_size"] == 128 * 128
    # A gathered layer (12 d^2 parameters) is released unless it is needed again within four layers.
    assert zero["stage3_max_reuse_distance"] == zero["stage3_max_live_parameters"] == 4 * 12 * 128 * 128
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 10**9}}))
    zero = deepspeed_config(_cfg(*DEEPSPEED, "trainer.zero_stage=3", f"trainer.deepspeed_config={user}"),
                            "bf16-mixed")["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 10**9
    assert "reduce_bucket_size" not in deepspeed_config(_cfg(*DEEPSPEED, "trainer.zero_stage=2"),
                                                        "bf16-mixed")["zero_optimization"]


@pytest.mark.parametrize(("precision", "section"), [("32-true", None), ("16-mixed", "fp16"), ("bf16-true", "bf16")])
def test_precision_enables_the_matching_section(precision: str, section: str | None) -> None:
    config = deepspeed_config(_cfg(*DEEPSPEED), precision)
    assert [key for key in ("bf16", "fp16") if key in config] == ([section] if section else [])


def test_offload_moves_optimizer_states_and_parameters_to_cpu() -> None:
    cfg = _cfg(*DEEPSPEED, "trainer.zero_stage=3", "trainer.offload_optimizer=true", "trainer.offload_params=true")
    zero = deepspeed_config(cfg, "bf16-mixed")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


def test_a_user_json_is_merged_over_the_generated_config(tmp_path: Path) -> None:
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7, "overlap_comm": False},
                                "wall_clock_breakdown": True}))
    config = deepspeed_config(_cfg(*DEEPSPEED, f"trainer.deepspeed_config={user}"), "bf16-mixed")
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                           "reduce_bucket_size": 5e7}
    assert config["wall_clock_breakdown"] is True and config["train_batch_size"] == 8


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, "'train_micro_batch_size_per_gpu' in {} is set by the recipe; change "
                                                "trainer.micro_batch_size instead"),
        ({"zero_optimization": {"stage": 1}}, "'zero_optimization.stage' in {} is set by the recipe; change "
                                              "trainer.zero_stage instead"),
        ({"bf16": {"enabled": False}}, "'bf16.enabled' in {} is set by the recipe; change trainer.precision instead"),
        ({"optimizer": {"type": "Adam"}}, "'optimizer' in {} is set by the recipe; change the optim section"),
        ([1, 2], "'trainer.deepspeed_config' {} must hold a JSON object, not list"),
    ],
)
def test_a_user_json_may_not_change_what_the_recipe_owns(tmp_path: Path, user: object, message: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError) as info:
        deepspeed_config(_cfg(*DEEPSPEED, f"trainer.deepspeed_config={path}"), "bf16-mixed")
    assert message.format(path) in str(info.value)


@pytest.mark.parametrize(("content", "message"), [(None, "file not found"), ("{oops", "is not valid JSON")])
def test_an_unreadable_user_json_is_a_one_line_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        deepspeed_config(_cfg(*DEEPSPEED, f"trainer.deepspeed_config={path}"), "bf16-mixed")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("trainer.strategy=fsdp",), "'trainer.strategy' must be one of auto, ddp, deepspeed"),
        (("trainer.zero_stage=4",), "'trainer.zero_stage' must be one of 1, 2, 3; got 4"),
        (("trainer.offload_optimizer=true",), "need trainer.strategy=deepspeed; got 'auto'"),
        ((*DEEPSPEED, "trainer.offload_params=true"), "'trainer.offload_params' needs trainer.zero_stage=3"),
        ((*DEEPSPEED, "trainer.global_batch_size=10", "trainer.micro_batch_size=4"),
         "'trainer.global_batch_size' (10) is not divisible by micro_batch_size x world size (4 x 2 = 8)"),
    ],
)
def test_impossible_strategy_settings_are_one_line_errors(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        deepspeed_config(_cfg(*overrides), "bf16-mixed")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_deepspeed_is_refused_on_cpu_with_a_pointer_to_ddp() -> None:
    assert build_strategy(_cfg("trainer.strategy=ddp", "trainer.devices=2"), "cpu", "32-true") == "ddp"
    with pytest.raises(ConfigError, match=r"deepspeed needs GPUs .* use ddp on CPU"):
        build_strategy(_cfg(*DEEPSPEED), "cpu", "32-true")


def test_ddp_on_one_process_trains_with_the_single_device_strategy(caplog) -> None:
    # DDP with nothing to all-reduce would still split the compiled graph at its buckets (dynamo's DDPOptimizer)
    caplog.set_level(logging.INFO, logger="pope_lm")
    one = resolve_strategy(_cfg("trainer.strategy=ddp", "trainer.devices=1"), None)
    assert one.trainer.strategy == "auto" and build_strategy(one, "gpu", "bf16-mixed") == "auto"
    assert caplog.messages[-1] == ("trainer.strategy=ddp -> auto: one process has nothing to all-reduce, so this run "
                                   "trains with the single-device strategy")
    two_nodes = _cfg("trainer.strategy=ddp", "trainer.num_nodes=2")
    assert resolve_strategy(two_nodes, None) is two_nodes and build_strategy(two_nodes, "gpu", "bf16-mixed") == "ddp"


def test_deepspeed_on_one_process_trains_single_device_unless_it_does_something_there(tmp_path: Path,
                                                                                      caplog) -> None:
    caplog.set_level(logging.INFO, logger="pope_lm")
    for stage in (1, 2):  # ZeRO-1/2 shard over the ranks: nothing to shard on one
        one = _cfg("trainer.strategy=deepspeed", f"trainer.zero_stage={stage}", "trainer.devices=1")
        assert resolve_strategy(one, None).trainer.strategy == "auto"
        assert caplog.messages[-1] == (f"trainer.strategy=deepspeed -> auto: ZeRO-{stage} on one process shards "
                                       "nothing, so this run trains with the single-device strategy (checkpoints "
                                       "are files)")
    zero_dir = tmp_path / checkpoint_name(4)
    zero_dir.mkdir()
    user_json = tmp_path / "ds.json"
    user_json.write_text("{}")
    kept = [
        (_cfg(*DEEPSPEED), None),  # two processes
        (_cfg("trainer.strategy=deepspeed", "trainer.devices=1", "trainer.zero_stage=3"), None),
        (_cfg("trainer.strategy=deepspeed", "trainer.devices=1", "trainer.offload_optimizer=true"), None),
        (_cfg("trainer.strategy=deepspeed", "trainer.devices=1", f"trainer.deepspeed_config={user_json}"), None),
        (_cfg("trainer.strategy=deepspeed", "trainer.devices=1"), zero_dir),  # only DeepSpeed reads its directories
    ]
    for cfg, resume_path in kept:
        assert resolve_strategy(cfg, resume_path) is cfg


def test_a_deepspeed_recipe_trains_on_one_process_without_deepspeed(tmp_path: Path) -> None:
    # what `pope-lm train recipes/774m.yaml` does on one GPU (here the CPU, which DeepSpeed itself would refuse)
    assert main(["train", str(TINY), *FAST, "trainer.strategy=deepspeed", "trainer.max_steps=2",
                 "checkpoint.every_n_steps=2", "trainer.val_every_n_steps=100", f"run_dir={tmp_path}"]) == 0
    checkpoint = tmp_path / "checkpoints" / checkpoint_name(2)
    assert checkpoint.is_file()  # Lightning's own format, not a ZeRO directory
    assert checkpoint_state(checkpoint)[CONFIG_KEY]["trainer"]["strategy"] == "auto"  # what ran


def test_resuming_a_zero_directory_without_deepspeed_is_a_one_line_error(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    sharded = tmp_path / checkpoint_name(4)
    sharded.mkdir()
    assert main(["train", str(TINY), f"run_dir={tmp_path}", f"resume={sharded}"]) == 2
    assert capsys.readouterr().err == (f"error: {sharded} is a DeepSpeed (ZeRO) checkpoint; resume it with "
                                       "trainer.strategy=deepspeed\n")


_TORCHRUN = {"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4",
             "TORCHELASTIC_RUN_ID": "test"}
_SRUN = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "pope-lm",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


@pytest.mark.parametrize(("launcher", "env"), [("torchrun", _TORCHRUN), ("srun", _SRUN)])
def test_the_recipe_must_describe_the_processes_the_launcher_started(monkeypatch: pytest.MonkeyPatch, launcher: str,
                                                                    env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check_launcher_geometry(_cfg("trainer.devices=2", "trainer.num_nodes=2"))
    with pytest.raises(ConfigError) as info:
        check_launcher_geometry(_cfg("trainer.devices=4"))
    assert str(info.value) == (f"{launcher} started 4 processes (2 per node) but 'trainer.devices' x "
                               "'trainer.num_nodes' is 4 x 1; pass trainer.devices=2 trainer.num_nodes=2")


def test_under_srun_lightnings_own_requeue_is_off_and_torchrun_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _SRUN.items():
        monkeypatch.setenv(key, value)
    [environment] = cluster_plugins()
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    for key, value in _TORCHRUN.items():
        monkeypatch.setenv(key, value)
    assert cluster_plugins() == []  # torchrun inside a Slurm allocation: Lightning's TorchElastic detection


def test_outside_slurm_the_srun_hint_is_left_to_the_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Slurm login node Lightning hints to prepend srun; pope-lm's own checks must not print it twice more."""
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME", *_TORCHRUN):
        monkeypatch.delenv(key, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cluster_plugins() == []
        check_launcher_geometry(_cfg("trainer.devices=4"))
        SLURMEnvironment.detect()  # what the Trainer runs: the hint itself still comes, once
    assert ["srun" in str(w.message) for w in caught] == [True]


def test_sigusr1_stops_training_after_the_next_logged_optimizer_step() -> None:
    stopper = StopOnSignal(every_n_steps=2)
    trainer = SimpleNamespace(global_step=0, should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    previous = signal.getsignal(signal.SIGUSR1)
    stopper.setup(trainer, None, "fit")  # type: ignore[arg-type]
    try:
        stopper.on_train_start(trainer, None)  # type: ignore[arg-type]
        trainer.global_step = 2
        stopper.on_train_batch_end(trainer)  # type: ignore[arg-type]
        assert not trainer.should_stop
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopper.received
        for step in (2, 3):  # a micro-batch of the next step (no new optimizer step), then an unlogged step
            trainer.global_step = step
            stopper.on_train_batch_end(trainer)  # type: ignore[arg-type]
            assert not trainer.should_stop
        trainer.global_step = 4
        stopper.on_train_batch_end(trainer)  # type: ignore[arg-type]
        assert trainer.should_stop and stopper.stopped
    finally:
        stopper.teardown(trainer, None, "fit")  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_zero_checkpoint_directories_appear_complete_and_the_oldest_go(tmp_path: Path) -> None:
    """DeepSpeed writes a directory with every rank: pope-lm shows it under its final name only when complete."""
    strategy = DeepSpeedStrategy(config={})  # constructing it is fine on CPU; only its setup needs CUDA
    strategy.barrier = lambda *args: None  # type: ignore[method-assign]

    def save_checkpoint(path: Path, weights_only: bool) -> None:
        assert path.name.endswith(".tmp") and not path.exists()  # a stale temporary directory was removed first
        final_existed.append(path.with_suffix("").exists())
        (path / "checkpoint").mkdir(parents=True)
        (path / "latest").write_text(f"checkpoint {trainer.global_step} {len(final_existed)}")

    final_existed: list[bool] = []
    trainer = SimpleNamespace(strategy=strategy, is_global_zero=True, global_step=0, save_checkpoint=save_checkpoint)
    directory = tmp_path / "checkpoints"
    (directory / (checkpoint_name(2) + ".tmp") / "stale").mkdir(parents=True)  # left by a run killed mid-save
    periodic = PeriodicCheckpoint(directory, every_n_steps=2, keep_last=2)
    for step in (2, 4, 6, 6):  # the last: the final step saved again right after resuming at it
        trainer.global_step = step
        periodic.save(trainer)  # type: ignore[arg-type]
    assert final_existed == [False, False, False, True]  # only ever renamed into place, complete
    assert sorted(p.name for p in directory.iterdir()) == [checkpoint_name(4), checkpoint_name(6)]
    assert (directory / checkpoint_name(6) / "latest").read_text() == "checkpoint 6 4"  # replaced by the re-save


def test_a_directory_that_is_no_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a checkpoint: neither a file nor a DeepSpeed checkpoint directory"):
        checkpoint_state(tmp_path)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_model(tmp_path / "missing.ckpt")


def _torchrun(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONFAULTHANDLER: a rank that aborts in native code (as rank 1 of deepspeed_worker.py did at interpreter
    # teardown, before it ended with os._exit) prints where each thread was
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             str(REPO / "tests" / script), *args], env=launcher_env(PYTHONFAULTHANDLER="1"), cwd=cwd,
                            capture_output=True, text=True, timeout=400)
    if result.returncode != 0:
        # Torch's deprecation warnings fill the output of every collective; keep what says why the ranks stopped.
        lines = [line for line in (result.stdout + result.stderr).splitlines()
                 if "Warning" not in line and "return func(" not in line]
        pytest.fail(f"torchrun {script} exited with {result.returncode}:\n" + "\n".join(lines[-80:]))
    return result


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zero")
    _torchrun("deepspeed_worker.py", str(out), cwd=out)
    return out


def _assert_phase_biases_in_range(weights: dict[str, torch.Tensor], pushed_to_bound: bool = True) -> None:
    deltas = torch.cat([w.detach().flatten() for name, w in weights.items() if name.endswith("position.delta")])
    assert deltas.min() >= -2 * math.pi and deltas.max() <= 0.0
    if pushed_to_bound:  # the worker's large first step pushed some against the bound: the clamp had work
        assert (deltas == 0.0).any()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_consolidates_to_the_engines_weights(zero_runs: Path, tmp_path: Path, stage: int) -> None:
    result = torch.load(zero_runs / f"zero{stage}" / "result.pt")
    out = tmp_path / "model.safetensors"
    assert main(["consolidate", str(zero_runs / f"zero{stage}" / checkpoint_name(4)), str(out)]) == 0
    consolidated = load_file(out)
    engine = {name.removeprefix("model."): weight for name, weight in result["weights"].items()}
    assert consolidated.keys() == engine.keys()
    for name, weight in engine.items():
        assert consolidated[name].dtype == torch.float32
        torch.testing.assert_close(consolidated[name], weight, rtol=0, atol=0, msg=name)
    _assert_phase_biases_in_range(consolidated)  # the clamp reached DeepSpeed's sharded fp32 master weights
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()[CONFIG_KEY])["trainer"]["zero_stage"] == stage


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_resumes_from_its_checkpoint_on_the_same_curve(zero_runs: Path, stage: int) -> None:
    result = torch.load(zero_runs / f"zero{stage}" / "result.pt")
    assert result["resumed_losses"] == pytest.approx(result["losses"][2:], abs=1e-6)


@pytest.mark.slow
def test_zero3_gathers_the_mlp_weights_that_the_fused_gelu_op_reads(zero_runs: Path) -> None:
    plain, fused = (torch.load(zero_runs / name / "result.pt") for name in ("zero3", "zero3-fused-mlp"))
    assert fused["losses"] == plain["losses"] and fused["resumed_losses"] == plain["resumed_losses"]
    for name, weight in plain["weights"].items():
        torch.testing.assert_close(fused["weights"][name], weight)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero2", "zero3", "zero3-fused-mlp"])
def test_the_model_called_outside_the_engine_scores_as_inside(zero_runs: Path, run: str) -> None:
    # LitGPT.on_train_start scores the initial model so, outside DeepSpeed's forward: under ZeRO-3 every parameter a
    # module reads without owning it must be registered (strategy.register_zero3_external_parameters)
    outside, inside = torch.load(zero_runs / run / "result.pt")["scores"]
    assert outside == pytest.approx(inside, abs=1e-6)


@pytest.mark.slow
def test_zero2_and_zero3_follow_the_same_loss_curve(zero_runs: Path) -> None:
    zero2, zero3 = (torch.load(zero_runs / f"zero{stage}" / "result.pt")["losses"] for stage in (2, 3))
    assert zero2 == pytest.approx(zero3, abs=1e-5)


LIGHTNING_RUN = (*FAST, "trainer.devices=2", "trainer.accelerator=cpu", "trainer.global_batch_size=8",
                 "checkpoint.every_n_steps=3", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=100",
                 "optim.warmup_steps=2")
# ZeRO-1 runs the same pope-lm code as ZeRO-2 (DeepSpeed's stage-1/2 optimizer); it is left to the GPU
# benchmark to keep this file's runs short.
STRATEGIES = {"ddp": ("trainer.strategy=ddp",),
              **{f"zero{stage}": ("trainer.strategy=deepspeed", f"trainer.zero_stage={stage}") for stage in (2, 3)}}


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pope-lm train` for 6 steps (2 ranks, 2 micro-batches each per step) under DDP, ZeRO-2 and ZeRO-3."""
    root = tmp_path_factory.mktemp("lightning")
    for name, strategy in STRATEGIES.items():
        _torchrun("lightning_deepspeed_cpu.py", "train", str(TINY), *LIGHTNING_RUN, *strategy, f"name={name}",
                  "trainer.max_steps=6", cwd=root)
    return root


def _history(run_dir: Path, key: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    [run_id] = mlflow_run_ids(run_dir)
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_zero_stages_follow_the_ddp_loss_curve(lightning_runs: Path, stage: int) -> None:
    """The CPU miniature of the GPU comparison (fp32). It fails if DeepSpeed divides the loss by the accumulation a
    second time (the clip then acts on other steps) or if PoPE's delta escapes its range in the master weights."""
    ddp, zero = lightning_runs / "runs" / "ddp", lightning_runs / "runs" / f"zero{stage}"
    assert len(_history(zero, "train/loss")) == 6
    assert _history(zero, "train/loss") == pytest.approx(_history(ddp, "train/loss"), abs=1e-4)
    assert _history(zero, "grad_norm") == pytest.approx(_history(ddp, "grad_norm"), rel=1e-3)


@pytest.mark.slow
def test_zero3_run_saves_checkpoint_directories_and_resumes_from_them(lightning_runs: Path) -> None:
    run_dir = lightning_runs / "runs" / "zero3"
    assert checkpoint_steps(run_dir) == [3, 6]
    assert all(p.is_dir() for p in (run_dir / "checkpoints").iterdir())  # ZeRO shards, nothing left as .tmp
    resumed = _torchrun("lightning_deepspeed_cpu.py", "train", str(TINY), *LIGHTNING_RUN, *STRATEGIES["zero3"],
                        "name=zero3", "trainer.max_steps=8", "resume=auto", cwd=lightning_runs)
    log = resumed.stdout + resumed.stderr
    assert "Restored all states from the checkpoint at runs/zero3/checkpoints/step-00000006.ckpt" in log
    assert "handles gradient clipping internally" not in log  # Lightning's warning, moot: DeepSpeed's config clips
    assert "done: step 8" in log
    final = run_dir / "checkpoints" / checkpoint_name(8)
    assert mlflow_run_ids(run_dir) == [checkpoint_state(final)[RUN_ID_KEY]]  # the resumed run continued it
    model, cfg = load_model(final)
    assert cfg.trainer.zero_stage == 3 and cfg.trainer.max_steps == 8
    _assert_phase_biases_in_range(dict(model.named_parameters()), pushed_to_bound=False)
