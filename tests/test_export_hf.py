"""`pope-lm export-hf`: the exported folder loads offline through transformers' Auto classes and computes exactly
what the native model computes (logits, greedy generation with a KV cache), for PoPE and RoPE models."""

import ast
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pope_lm.checkpointing import load_model
from pope_lm.cli import main
from pope_lm.config import ConfigError, ModelConfig, RunConfig, config_to_container
from pope_lm.data.tokenizers import get_tokenizer
from pope_lm.hf.configuration_pope_lm import PopeLMConfig
from pope_lm.hf.export import bundle_sources, export_checkpoint, save_hf_tokenizer
from pope_lm.hf.modeling_pope_lm import PopeLMForCausalLM
from pope_lm.model import GPT
from pope_lm.sampling import SamplingSettings, generate

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."


@pytest.fixture(scope="module", params=["pope", "rope"])
def exported(request, make_tiny_checkpoint, tmp_path_factory):
    checkpoint = make_tiny_checkpoint(request.param)
    out = tmp_path_factory.mktemp(f"export-{request.param}") / "model"
    assert main(["export-hf", str(checkpoint), str(out)]) == 0
    return checkpoint, out


def test_folder_holds_weights_config_code_generation_config_and_tokenizer(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "configuration_pope_lm.py", "modeling_pope_lm.py", "model.py", "position.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_pope_lm.PopeLMConfig",
                                  "AutoModelForCausalLM": "modeling_pope_lm.PopeLMForCausalLM"}
    assert config["attention_backend"] == "reference" and config["eos_token_id"] == 50256


def test_exported_logits_equal_native_logits(exported):
    checkpoint, out = exported
    native, cfg = load_model(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]] * 2)
    with torch.no_grad():
        expected = native.eval()(ids)[..., : cfg.model.vocab_size]
        got = hf(ids).logits
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_generate_with_kv_cache_equals_the_native_sampler(exported):
    checkpoint, out = exported
    native, _ = load_model(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.tensor([get_tokenizer("gpt2").encode("Once upon a time").tolist()])
    settings = SamplingSettings(max_new_tokens=24, greedy=True)
    expected = generate(native.eval(), prompt, settings)
    with torch.no_grad():
        cached = hf.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        uncached = hf.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24, use_cache=False)
    assert cached[0, prompt.shape[1]:].tolist() == expected[0].tolist()
    assert torch.equal(cached, uncached)


def test_exported_code_runs_without_pope_lm_installed(exported):
    _, out = exported
    script = (
        "import sys; sys.modules['pope_lm'] = None\n"  # any `import pope_lm...` now fails
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape[-1])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "50257"


def test_auto_tokenizer_matches_the_training_tokenizer(exported):
    _, out = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXT)["input_ids"] == get_tokenizer("gpt2").encode(TEXT).tolist()
    assert tokenizer.eos_token_id == 50256


def test_bundled_modules_import_each_other_relatively_and_keep_only_lazy_pope_lm_imports():
    sources = bundle_sources()
    assert {"modeling_pope_lm.py", "configuration_pope_lm.py", "model.py", "position.py", "reference.py",
            "model_config.py", "rope_scaling.py"} == set(sources)
    for name, source in sources.items():
        tree = ast.parse(source)
        for node in tree.body:  # module level: nothing may import pope_lm
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("pope_lm"), (name, node.module)
    assert "from .reference import pope_attention_reference" in sources["position.py"]
    assert "from .model_config import ModelConfig" in sources["model.py"]


def test_rope_scaling_survives_export_and_meta_device_loading(tmp_path):
    # RoPE's frequency table is a non-persistent buffer: transformers builds the model on the meta device and
    # must recompute it (via _init_weights -> RoPE.reset_parameters), or the model runs on garbage.
    torch.manual_seed(0)
    model_cfg = ModelConfig(vocab_size=100, n_layer=2, d_model=32, n_head=4, head_dim=8, position="rope",
                            rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_original_max_len=16)
    native = GPT(model_cfg).eval()
    hf = PopeLMForCausalLM(PopeLMConfig(**vars(model_cfg)))
    hf.model.load_state_dict(native.state_dict())
    hf.save_pretrained(tmp_path)
    loaded = PopeLMForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, native(ids)[..., :100])


def test_tanh_gelu_survives_export(tmp_path):
    torch.manual_seed(0)
    model_cfg = ModelConfig(vocab_size=100, n_layer=2, d_model=32, n_head=4, head_dim=8, activation="gelu_tanh")
    native = GPT(model_cfg).eval()
    hf = PopeLMForCausalLM(PopeLMConfig(**vars(model_cfg)))
    hf.model.load_state_dict(native.state_dict())
    hf.save_pretrained(tmp_path)
    loaded = PopeLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.activation == "gelu_tanh"
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, native(ids)[..., :100])
        native.blocks[0].mlp.approximate = "none"  # the test can tell the two GELUs apart
        assert not torch.allclose(loaded(ids).logits, native(ids)[..., :100])


def test_left_padding_is_refused_and_right_padding_changes_nothing(exported):
    _, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = hf(ids).logits
        right = hf(ids, attention_mask=torch.tensor([[1, 1, 1, 0]])).logits
        torch.testing.assert_close(right[:, :3], plain[:, :3])
        with pytest.raises(ValueError, match="right padding only"):
            hf(ids, attention_mask=torch.tensor([[0, 1, 1, 1]]))


@pytest.mark.parametrize("name", ["nt-6mer", "dna-char"])
def test_dna_tokenizers_export_with_identical_ids(name, tmp_path):
    ours = get_tokenizer(name)
    save_hf_tokenizer(ours, tmp_path, model_max_length=1000)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    dna = "".join(rng.choice(list("ACGT"), 200)) + "NN" + "".join(rng.choice(list("acgtn"), 97))
    assert theirs(dna, add_special_tokens=False)["input_ids"] == ours.encode(dna).tolist()
    assert theirs.eos_token_id == ours.eos_id


def test_a_task_tokenizer_without_a_hf_equivalent_is_refused_before_writing(indirect_checkpoint, tmp_path, capsys):
    assert main(["export-hf", str(indirect_checkpoint), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "error: export-hf supports the gpt2, nt-6mer, dna-char tokenizers, not 'indirect-char' (no Hugging Face "
        "tokenizer is defined for it); nothing was written\n")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="no Hugging Face equivalent is known for tokenizer 'jsb-16th'"):
        save_hf_tokenizer(get_tokenizer("jsb-16th"), tmp_path, model_max_length=64)


def test_existing_non_empty_output_is_refused_and_left_untouched(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export-hf", str(tiny_checkpoint), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output path") and "exists and is not an empty directory" in err
    assert len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".taken.tmp-*"))


def test_checkpoint_of_another_architecture_or_missing_gives_one_line(tmp_path, capsys):
    foreign = tmp_path / "gpt2.ckpt"
    torch.save({"state_dict": {"transformer.wte.weight": torch.zeros(2, 2)}}, foreign)
    assert main(["export-hf", str(foreign), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {foreign} is not a pope-lm checkpoint (no 'pope_lm_config' entry)"
    assert main(["export-hf", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'nope.ckpt'}"
    mismatched = tmp_path / "other-shape.ckpt"  # a pope-lm config whose weights belong to another model
    torch.save({"state_dict": {"model.embedding.weight": torch.zeros(3, 3)},
                "pope_lm_config": config_to_container(RunConfig())}, mismatched)
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    for path in (mismatched, not_a_checkpoint):
        assert main(["export-hf", str(path), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot load {path} as a pope-lm checkpoint: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_dtype_is_a_config_error(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out", dtype="int8")
