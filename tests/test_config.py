"""Recipes load into typed configs; every user mistake becomes one line that names the key or file."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

from pope_lm.cli import main
from pope_lm.config import ConfigError, RunConfig, flatten, load_config

RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(recipe):
    assert isinstance(load_config(recipe), RunConfig)


def test_paper_recipes_carry_the_paper_settings():
    big = load_config("recipes/774m.yaml")
    assert (big.model.n_layer, big.model.d_model, big.model.n_head, big.model.head_dim) == (36, 1280, 20, 64)
    assert (big.optim.lr, big.optim.min_lr, big.optim.beta2, big.optim.warmup_steps) == (6e-4, 6e-5, 0.95, 1000)
    assert (big.trainer.global_batch_size, big.data.seq_len, big.trainer.max_steps) == (64, 1024, 100_000)


def test_overrides_win_over_the_recipe():
    cfg = load_config("recipes/tiny.yaml", ["model.position=rope", "trainer.max_steps=7", "optim.lr=1e-3"])
    assert (cfg.model.position, cfg.trainer.max_steps, cfg.optim.lr) == ("rope", 7, 1e-3)


def test_micro_batch_size_takes_a_number_or_auto():
    assert load_config("recipes/tiny.yaml", ["trainer.micro_batch_size=4"]).trainer.micro_batch_size == 4
    assert load_config("recipes/tiny.yaml", ["trainer.micro_batch_size=auto"]).trainer.micro_batch_size == "auto"


def test_flatten_gives_dotted_keys():
    flat = flatten(load_config("recipes/tiny.yaml"))
    assert flat["model.n_layer"] == 4 and flat["data.dataset"] == "shakespeare"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.n_layr=3"], "unknown key 'model.n_layr' in override 'model.n_layr=3'; did you mean 'model.n_layer'?"),
        (["model.n_layer=abc"], "wrong type for 'model.n_layer'"),
        (["model.position=alibi"], "'model.position' must be one of pope, rope, none"),
        (["model.n_head=3"], "'model.n_head' x 'model.head_dim' must equal 'model.d_model'"),
        (["trainer.max_steps"], "not of the form key=value"),
        (["optim.min_lr=1.0"], "'optim.min_lr' must be in [0, optim.lr]"),
        (["optim.warmup_steps=10", "optim.decay_steps=10"], "'optim.decay_steps' must be 0 (decay until"),
        (["trainer.max_time=8min"], "'trainer.max_time' must read DD:HH:MM:SS; got '8min'"),
        (["trainer.test_on=best"], "'trainer.test_on' best needs checkpoint.keep_best=true"),
        (["trainer.test_on=first"], "'trainer.test_on' must be one of last, best"),
        (["trainer.compile_mode=fast"], "'trainer.compile_mode' must be one of default, reduce-overhead"),
        (["trainer.matmul_precision=tf32"], "'trainer.matmul_precision' must be one of highest, high, medium"),
        (["trainer.micro_batch_size=0"], "'trainer.micro_batch_size' must be a positive integer or auto; got 0"),
        (["trainer.micro_batch_size=-3"], "'trainer.micro_batch_size' must be a positive integer or auto; got -3"),
        (["trainer.micro_batch_size=big"], "'trainer.micro_batch_size' must be a positive integer or auto; got 'big'"),
        (["trainer.micro_batch_size=2.5"], "wrong type for 'trainer.micro_batch_size'"),
    ],
)
def test_bad_overrides_raise_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("recipes/tiny.yaml", overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_key_in_a_recipe_file_lists_the_valid_keys(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate' in .*typo.yaml.*valid keys: lr, min_lr"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "missing.yaml"], "error: recipe file not found: missing.yaml"),
        (["train", "recipes/tiny.yaml", "model.nope=1"], "error: unknown key 'model.nope'"),
        (["train", "recipes/tiny.yaml", "trainer.devices=two"], "error: wrong type for 'trainer.devices'"),
        (["train", "recipes/tiny.yaml", "trainer.micro_batch_size=big"],
         "error: 'trainer.micro_batch_size' must be a positive integer or auto; got 'big'"),
    ],
)
def test_cli_reports_bad_input_in_one_line_with_exit_code_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(fragment) and "\n" not in err and "Traceback" not in err


def test_version_names_pope_lm_and_the_libraries_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pope-lm {importlib.metadata.version('pope-lm')} (torch {torch.__version__}, triton ")
    assert out.count("\n") == 1 and "lightning" in out and "deepspeed" in out
