"""`pope-lm eval-length`: perplexity per context length over non-overlapping windows, CSV + plot + MLflow."""

import csv
import random

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from mlflow import MlflowClient

from pope_lm.checkpointing import load_model
from pope_lm.cli import main
from pope_lm.config import ConfigError, RunConfig
from pope_lm.data.shards import Manifest, SplitInfo, write_manifest, write_shard
from pope_lm.data.tokenizers import get_tokenizer
from pope_lm.evaluation import (
    LENGTH_CSV,
    PLOT,
    POSITION_CSV,
    ModelSpec,
    find_tracking_store,
    load_scored_model,
    parse_lengths,
    score_length,
    windows,
)

LENGTHS = "32,64,96"


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """Three 'books' of pseudo-English (a fixed word list in random order), about 1500 GPT-2 tokens each."""
    rng = random.Random(0)
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
             "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you"]
    folder = tmp_path_factory.mktemp("books")
    for i in range(3):
        (folder / f"book{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(1400)) + ".\n")
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_parse_lengths_accepts_lists_and_ranges():
    assert parse_lengths("1024,2048, 4096") == [1024, 2048, 4096]
    assert parse_lengths("1024:10240:1024") == [1024 * k for k in range(1, 11)]


@pytest.mark.parametrize("bad", ["", "1024,abc", "0,1024", "-5", "1024:2048:0", "1.5", "10:20"])
def test_bad_lengths_give_one_line_and_exit_code_2(bad, tiny_checkpoint, books, capsys):
    assert main(["eval-length", str(tiny_checkpoint), "--data", str(books), "--lengths", bad]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --lengths must be positive integers 'a,b,c' or 'start:stop:step'; got '{bad}'\n"


def test_missing_checkpoint_and_missing_data_give_one_line(tiny_checkpoint, books, tmp_path, capsys):
    assert main(["eval-length", str(tmp_path / "no.ckpt"), "--data", str(books), "--lengths", "32"]) == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'no.ckpt'}\n"
    pattern = str(tmp_path / "*.txt")
    assert main(["eval-length", str(tiny_checkpoint), "--data", pattern, "--lengths", "32", "--no-tracking"]) == 2
    assert capsys.readouterr().err == (f"error: --data '{pattern}' matches no text file and is not a prepared "
                                       f"dataset\n")


def test_windows_are_non_overlapping_and_drop_the_short_tail():
    doc = np.arange(100)
    got = list(windows([doc], 32))
    assert [w[0] for w in got] == [0, 32, 64] and all(w.size == 33 for w in got)  # 96..99 cannot fill a window
    assert list(windows([np.arange(32)], 32)) == []  # 32 tokens predict only 31


def test_score_length_equals_the_model_loss_on_each_window(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    model.eval()
    docs = [np.random.default_rng(0).integers(0, 50257, 200)]
    result = score_length(model, docs, 64, "m", torch.device("cpu"), torch.float32, batch_size=2)
    with torch.no_grad():
        losses = [model(torch.from_numpy(w[None, :-1]), torch.from_numpy(w[None, 1:])).item()
                  for w in windows(docs, 64)]
    assert result.windows == 3 and result.tokens == 192
    assert result.loss == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert result.position_loss.shape == (64,)
    # a token budget gives every length the same leading text: 2 windows of 32 or 1 of 64 tokens
    capped = [score_length(model, docs, n, "m", torch.device("cpu"), torch.float32, max_tokens=64) for n in (32, 64)]
    assert [(r.windows, r.tokens) for r in capped] == [(2, 64), (1, 64)]


def test_eval_length_writes_csv_and_png_for_several_models_and_logs_to_mlflow(make_tiny_checkpoint, books,
                                                                              tmp_path):
    pope, rope = make_tiny_checkpoint("pope"), make_tiny_checkpoint("rope")
    out, db = tmp_path / "eval", tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    argv = ["eval-length", str(pope), str(rope), str(rope), "--data", str(books / "*.txt"), "--lengths", LENGTHS,
            "--rope-scaling", "none,none,yarn", "--scale-factor", "1,1,3", "--out", str(out), "--max-tokens", "1536",
            "--tracking-uri", f"sqlite:///{db}", "--experiment", "lengths"]
    assert main(argv) == 0

    rows = read_csv(out / LENGTH_CSV)
    assert [(r["model"], int(r["length"])) for r in rows] == [
        (label, length) for label in ("tiny-pope (pope)", "tiny-rope (rope)", "tiny-rope (rope+yarn x3)")
        for length in (32, 64, 96)]
    for r in rows:
        assert int(r["windows"]) > 0 and float(r["ppl"]) == pytest.approx(np.exp(float(r["loss"])), rel=1e-4)
    assert {r["scale_factor"] for r in rows if r["rope_scaling"] == "yarn"} == {"3"}
    positions = read_csv(out / POSITION_CSV)
    assert {(p["model"], int(p["length"])) for p in positions} == {(r["model"], int(r["length"])) for r in rows}
    image = imread(out / PLOT)
    assert image.shape[0] >= 500 and image.shape[1] >= 1200  # 13 x 5 inches at 120 dpi

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("lengths").experiment_id])
    history = client.get_metric_history(run.info.run_id, "ppl/tiny-rope _rope_yarn x3")
    assert [m.step for m in history] == [32, 64, 96]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval-length")}
    assert artifacts == {f"eval-length/{name}" for name in (LENGTH_CSV, POSITION_CSV, PLOT)}


def test_prepared_dataset_scores_like_the_text_files(tiny_checkpoint, books, tmp_path):
    tokenizer = get_tokenizer("gpt2")
    texts = [p.read_text() for p in sorted(books.glob("*.txt"))]
    stream = np.concatenate([np.append(tokenizer.encode(t), tokenizer.eos_id).astype(np.uint16) for t in texts])
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    shard = write_shard(dataset / "test-000000.tar", stream, block_len=128, pad_id=tokenizer.eos_id)
    write_manifest(dataset, Manifest(tokenizer="gpt2", vocab_size=50257, eos_id=50256, dtype="uint16",
                                     block_len=128, splits={"test": SplitInfo([shard], len(texts))},
                                     fingerprint="test"))
    for data, out in ((str(books), tmp_path / "a"), (str(dataset), tmp_path / "b")):
        assert main(["eval-length", str(tiny_checkpoint), "--data", data, "--lengths", "64", "--out", str(out),
                     "--no-tracking"]) == 0
    assert read_csv(tmp_path / "a" / LENGTH_CSV) == [
        {**row, "checkpoint": row["checkpoint"]} for row in read_csv(tmp_path / "b" / LENGTH_CSV)]


def test_rope_scaling_needs_a_rope_model_unless_given_once_for_all(make_tiny_checkpoint):
    pope = make_tiny_checkpoint("pope")
    with pytest.raises(ConfigError, match="--rope-scaling yarn needs a RoPE model"):
        load_scored_model(ModelSpec(pope, "yarn", 4.0), 128, broadcast=False)
    _, cfg, spec = load_scored_model(ModelSpec(pope, "yarn", 4.0), 128, broadcast=True)
    assert spec.rope_scaling == "none" and cfg.model.position == "pope"
    model, cfg, spec = load_scored_model(ModelSpec(make_tiny_checkpoint("rope"), "ntk"), 128, broadcast=True)
    # default factor: longest length / training length (32)
    assert (cfg.model.rope_scaling_type, cfg.model.rope_scaling_factor, spec.scale_factor) == ("ntk", 4.0, 4.0)
    # NTK-aware interpolates the lowest frequency (head dim 8) by exactly the factor
    assert model.blocks[0].attn.position.inv_freq[-1].item() == pytest.approx(10000.0 ** (-6 / 8) / 4, rel=1e-6)


def test_training_run_store_is_found_next_to_the_checkpoint(tmp_path):
    run_dir = tmp_path / "moved-run"
    (run_dir / "checkpoints").mkdir(parents=True)
    MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").search_experiments()  # creates the store
    cfg = RunConfig(run_dir="runs/where-it-was-trained")
    checkpoint = run_dir / "checkpoints" / "step-00000010.ckpt"
    assert find_tracking_store(checkpoint, cfg) == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    cfg.tracking.enabled = False
    assert find_tracking_store(checkpoint, cfg) is None


@pytest.mark.parametrize("size", ["124m", "253m", "774m"])
def test_finetune_recipes_follow_the_papers_4096_token_protocol(size):
    from pope_lm.config import load_config

    ft, base = load_config(f"recipes/{size}-ft4096.yaml"), load_config(f"recipes/{size}.yaml")
    assert ft.model == base.model
    assert (ft.data.seq_len, ft.trainer.max_steps, ft.trainer.global_batch_size) == (4096, 500, 64)
    assert (ft.optim.lr, ft.optim.min_lr, ft.optim.warmup_steps) == (6e-5, 6e-5, 20)  # constant after warmup
