"""`pope-lm train` end to end on the CPU: real text, a real MLflow store, real checkpoints, exact resume."""

from __future__ import annotations

import io
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from launch_helpers import FAST, TINY
from mlflow import MlflowClient

from pope_lm.checkpointing import list_checkpoints
from pope_lm.cli import main
from pope_lm.config import load_config
from pope_lm.data.corpora import prepare_text
from pope_lm.data.prepare import Settings
from pope_lm.data.shards import write_token_dataset
from pope_lm.train import compiles, set_matmul_precision, train

pytestmark = pytest.mark.slow

# A 2-layer model small enough that a step takes milliseconds; the GPT-2 head still dominates.
MICRO = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.head_dim=32",
         "data.seq_len=32", "data.val_batches=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=4"]


def pope_lm(*args: str, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pope_lm.cli", "train", *args, f"run_dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def mlflow_run(run_dir: Path):
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pope-lm").experiment_id])
    return client, runs


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """Last logged value per step (a resumed run re-logs the steps after its checkpoint)."""
    values: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step)):
        values[m.step] = m.value
    return values


def test_no_advice_to_add_workers_to_the_evaluation_loaders(tmp_path, monkeypatch, recwarn):
    # Lightning advises it where the machine has cores to spare (this one has 2: pretend 8); the evaluation loaders
    # read in the main process by design, so the advice only misleads.
    import lightning.pytorch.trainer.connectors.data_connector as data_connector

    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda num_devices: 8)
    assert main(["train", str(TINY), *FAST, "trainer.max_steps=2", "trainer.val_every_n_steps=1",
                 "data.num_workers=2", f"run_dir={tmp_path}"]) == 0
    assert not [w for w in recwarn if "does not have many workers" in str(w.message)]


def test_tiny_recipe_learns_shakespeare_and_logs_to_mlflow(tmp_path):
    run_dir = tmp_path / "tiny"
    out = finish(pope_lm("recipes/tiny.yaml", *MICRO, "data.seq_len=64", "trainer.max_steps=40",
                         "trainer.val_every_n_steps=40", "optim.warmup_steps=10", "checkpoint.every_n_steps=20",
                         run_dir=run_dir))
    assert out.count("GPU available:") == 1, "Lightning's messages are printed once"
    assert "litlogger" not in out and "LeafSpec" not in out  # library noise the CLI filters
    # Piped (as into a Slurm log): a line per refresh point and per validation, no tqdm bar redrawn in place.
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["10/40", "20/40", "30/40",
                                                                                        "40/40"]
    assert any(line.startswith("validation at step 40: val/loss=") for line in out.splitlines())
    assert "it/s" not in out

    client, runs = mlflow_run(run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["model.position"] == "pope" and run.data.params["trainer.max_steps"] == "40"
    val = history(client, run.info.run_id, "val/loss")
    first, last = val[min(val)], val[max(val)]
    assert first > 10.0 and last < first - 2.5, val  # from ~ln(50304) to well below
    assert len(history(client, run.info.run_id, "train/loss")) >= 4
    for key in ("lr", "grad_norm", "tokens_per_s", "val/ppl", "attn/max_logit", "attn/max_logit/layer_0"):
        assert history(client, run.info.run_id, key), key
    max_logit = history(client, run.info.run_id, "attn/max_logit")
    assert all(math.isfinite(v) and v > 0 for v in max_logit.values()), max_logit
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json"} <= artifacts
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000020.ckpt", "step-00000040.ckpt"]


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory) -> Path:
    """A small prepared dataset of made-up sentences (no network needed)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["the", "king", "queen", "sword", "crown", "speaks", "to", "of", "and", "in", "a", "my", "his", "her",
             "night", "day", "love", "war"]
    files = []
    for i in range(12):
        path = root / f"doc{i}.txt"
        path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(150)))
        files.append(str(path))
    out = root / "dataset"
    prepare_text(out, files[:10], Settings("gpt2", block_len=256, shard_tokens=4096), val_inputs=files[10:])
    return out


def test_killed_run_resumes_from_its_last_checkpoint_with_identical_losses(tmp_path, word_corpus):
    common = [*MICRO, f"data.dataset={word_corpus}", "trainer.max_steps=40", "trainer.log_every_n_steps=1",
              "trainer.val_every_n_steps=20", "checkpoint.every_n_steps=10", "checkpoint.keep_last=3",
              "optim.warmup_steps=5"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    finish(pope_lm("recipes/tiny.yaml", *common, run_dir=reference_dir))

    victim = pope_lm("recipes/tiny.yaml", *common, run_dir=killed_dir)
    deadline = time.monotonic() + 300
    while not list_checkpoints(killed_dir / "checkpoints"):
        assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    saved = list_checkpoints(killed_dir / "checkpoints")[-1]
    saved_step = int(saved.stem.split("-")[1])
    assert saved_step < 40

    out = finish(pope_lm("recipes/tiny.yaml", *common, "resume=auto", run_dir=killed_dir))
    assert "resuming from" in out
    progress = [line.split()[1] for line in out.splitlines() if line.startswith("step ")]
    assert progress == [f"{step}/40" for step in range(saved_step + 1, 41)]  # counted on from the checkpoint

    client, runs = mlflow_run(killed_dir)
    assert len(runs) == 1, "the resumed run must continue the same MLflow run"
    ref_client, ref_runs = mlflow_run(reference_dir)
    resumed = history(client, runs[0].info.run_id, "train/loss")
    reference = history(ref_client, ref_runs[0].info.run_id, "train/loss")
    after = [s for s in reference if s >= saved_step]
    assert len(after) >= 40 - saved_step - 1
    for step in after:
        assert math.isclose(resumed[step], reference[step], rel_tol=0, abs_tol=1e-6), (step, resumed[step])


def test_phase_biases_stay_in_range_during_training(tmp_path, word_corpus):
    run_dir = tmp_path / "delta"
    # A large learning rate pushes delta hard; uniform init starts some values near both bounds.
    finish(pope_lm("recipes/tiny.yaml", *MICRO, f"data.dataset={word_corpus}", "model.delta_init=uniform",
                   "optim.lr=0.5", "optim.min_lr=0.5", "optim.warmup_steps=0", "optim.grad_clip=0",
                   "trainer.max_steps=10", "trainer.val_every_n_steps=10", "tracking.enabled=false",
                   run_dir=run_dir))
    state = torch.load(list_checkpoints(run_dir / "checkpoints")[-1], weights_only=True)["state_dict"]
    deltas = torch.stack([v for k, v in state.items() if k.endswith("position.delta")])
    assert deltas.min() >= -2 * math.pi and deltas.max() <= 0.0
    assert (deltas == 0.0).any() or (deltas == -2 * math.pi).any(), "the test did not push delta to a bound"


class _BlockInputDtypesBeforeTheFirstStep(L.Callback):
    """The dtypes of the residual stream entering the blocks during the step-0 validation (LitGPT.on_train_start,
    which runs after the callbacks' on_train_start)."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.hooks: list = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.hooks = [block.register_forward_pre_hook(lambda _, args: self.dtypes.add(args[0].dtype))
                      for block in pl_module.model.blocks]

    def on_train_batch_start(self, *args: object) -> None:
        for hook in self.hooks:
            hook.remove()


def test_step_zero_validation_runs_in_the_runs_precision(tmp_path, word_corpus):
    # Under bf16-mixed it must run under autocast, as later validations do (on the GPU an fp32 pass also launched
    # the fp32 attention kernels, whose spills made CUDA reserve ~7 GB of local memory for the rest of the run).
    probe = _BlockInputDtypesBeforeTheFirstStep()
    train(load_config("recipes/tiny.yaml", [*MICRO, f"data.dataset={word_corpus}", "trainer.max_steps=1",
                                            "trainer.precision=bf16-mixed", "tracking.enabled=false",
                                            "data.num_workers=0", f"run_dir={tmp_path / 'run'}"]), [probe])
    assert probe.dtypes == {torch.bfloat16}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_redraws_once_per_refresh_point(tmp_path, word_corpus, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    train(load_config("recipes/tiny.yaml", [*MICRO, f"data.dataset={word_corpus}", "trainer.max_steps=6",
                                            "trainer.log_every_n_steps=2", "tracking.enabled=false",
                                            "data.num_workers=0", f"run_dir={tmp_path / 'run'}"]))
    redraws = [part.split("|")[2].split("[")[0].strip() for part in terminal.getvalue().split("\r")
               if part.startswith("step:") and "train/loss=" in part]
    # the last step's bar is drawn again by Lightning's validation and end of training
    assert [steps for steps in redraws if steps != "6/6"] == ["2/6", "4/6"]


def test_missing_dataset_fails_with_one_line(tmp_path):
    proc = pope_lm("recipes/tiny.yaml", f"data.dataset={tmp_path / 'nowhere'}", run_dir=tmp_path / "run")
    out = proc.communicate(timeout=120)[0].strip()
    assert proc.returncode == 2
    assert out.splitlines()[-1].startswith("error:") and "nowhere" in out.splitlines()[-1]
    assert "Traceback" not in out


def test_init_from_starts_a_fresh_run_from_pretrained_weights(tmp_path, word_corpus):
    common = [*MICRO, f"data.dataset={word_corpus}", "trainer.log_every_n_steps=1", "optim.warmup_steps=2"]
    finish(pope_lm("recipes/tiny.yaml", *common, "trainer.max_steps=30", "tracking.enabled=false",
                   run_dir=tmp_path / "pretrain"))
    pretrained = list_checkpoints(tmp_path / "pretrain" / "checkpoints")[-1]
    finish(pope_lm("recipes/tiny.yaml", *common, "trainer.max_steps=2", f"init_from={pretrained}",
                   run_dir=tmp_path / "finetune"))
    client, runs = mlflow_run(tmp_path / "finetune")
    losses = history(client, runs[0].info.run_id, "train/loss")
    assert min(losses) == 0 and losses[0] < 8.0, losses  # a fresh model starts near ln(50304) = 10.8
    assert list_checkpoints(tmp_path / "finetune" / "checkpoints")[-1].name == "step-00000002.ckpt"


def test_resuming_under_another_activation_fails_with_one_line(tmp_path, capsys):
    # the weights fit either GELU, so only the recorded config can tell that the function would change
    run = [str(TINY), *FAST, "trainer.val_every_n_steps=2", "checkpoint.every_n_steps=2", "tracking.enabled=false",
           f"run_dir={tmp_path}"]
    assert main(["train", *run, "trainer.max_steps=2", "model.activation=gelu"]) == 0
    assert main(["train", *run, "trainer.max_steps=4", "resume=auto", "model.activation=gelu_tanh"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.activation=gelu;" in error and "step-00000002.ckpt" in error, error


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_line(tmp_path, capsys):
    (tmp_path / "checkpoints").write_text("a file where the checkpoints should go")
    run = [str(TINY), *FAST, "trainer.max_steps=4", "checkpoint.every_n_steps=2", "tracking.enabled=false",
           f"run_dir={tmp_path}"]
    assert main(["train", *run]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: could not write checkpoint {tmp_path / 'checkpoints' / 'step-00000002.ckpt'}: ")


def test_skipped_corrupt_shards_are_counted_in_the_logged_metrics(tmp_path):
    rng = np.random.default_rng(0)
    dataset = tmp_path / "dataset"
    streams = {"train": rng.integers(0, 64, 8 * 512), "val": rng.integers(0, 64, 512)}
    write_token_dataset(dataset, streams, tokenizer="random", vocab_size=64, eos_id=0, block_len=64, shard_tokens=512)
    shard = dataset / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated mid-block
    run_dir = tmp_path / "run"
    # 8 shards of 15 windows, 4 windows per step: one epoch visits every shard within 32 steps.
    finish(pope_lm("recipes/tiny.yaml", *MICRO, f"data.dataset={dataset}", "data.skip_corrupt=true",
                   "model.vocab_size=64", "trainer.max_steps=40", "trainer.log_every_n_steps=1",
                   "trainer.val_every_n_steps=40", run_dir=run_dir))
    client, (run,) = mlflow_run(run_dir)
    assert max(history(client, run.info.run_id, "data/skipped_shards").values()) == 1


@pytest.mark.parametrize(
    ("overrides", "accelerator", "expected"),
    [
        ([], "cpu", False),
        ([], "gpu", True),  # the fast path by default
        (["trainer.strategy=deepspeed"], "gpu", True),  # ZeRO-2, the default stage
        (["trainer.strategy=deepspeed", "trainer.zero_stage=1"], "gpu", True),
        (["trainer.strategy=deepspeed", "trainer.zero_stage=3"], "gpu", False),
        (["trainer.compile=false"], "gpu", False),
        (["trainer.compile=true"], "cpu", True),
        (["trainer.compile=true", "trainer.strategy=deepspeed", "trainer.zero_stage=3"], "gpu", True),
    ],
)
def test_the_model_compiles_by_default_on_gpu_unless_set_or_under_zero3(overrides, accelerator, expected):
    assert compiles(load_config("recipes/tiny.yaml", overrides), accelerator) is expected


@pytest.mark.parametrize(("accelerator", "expected"), [("gpu", "high"), ("cpu", "highest")])
def test_fp32_matmuls_take_the_recipe_precision_on_gpu_and_stay_full_on_cpu(accelerator, expected):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        set_matmul_precision(load_config("recipes/tiny.yaml"), accelerator)
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)
