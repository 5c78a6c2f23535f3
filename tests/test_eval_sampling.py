"""`pope-lm sample`: KV-cache decoding from a native checkpoint."""

import pytest
import torch

from pope_lm import sampling
from pope_lm.checkpointing import load_model
from pope_lm.cli import main
from pope_lm.config import RunConfig
from pope_lm.data.tokenizers import get_tokenizer
from pope_lm.sampling import SamplingSettings, continuation_text, generate, resolve_tokenizer


@pytest.mark.parametrize("position", ["pope", "rope"])
def test_cached_greedy_decoding_equals_argmax_of_full_forward_passes(position, make_tiny_checkpoint):
    model, _ = load_model(make_tiny_checkpoint(position))
    model.eval()
    idx = torch.tensor([[464, 2068, 7586, 21831], [40, 588, 257, 3797]])
    got = generate(model, idx, SamplingSettings(max_new_tokens=12, greedy=True))
    context = idx
    with torch.no_grad():
        for _ in range(12):  # no cache: the whole context again at every step
            context = torch.cat((context, model(context)[:, -1, :50257].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(got, context[:, idx.shape[1]:])


def test_sampling_is_reproducible_by_seed_and_top_1_is_greedy(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    model.eval()
    idx = torch.tensor([[464, 2068]])

    def run(**kw):
        return generate(model, idx, SamplingSettings(max_new_tokens=16, **kw))

    assert torch.equal(run(seed=1, temperature=1.0, top_k=None), run(seed=1, temperature=1.0, top_k=None))
    assert not torch.equal(run(seed=1, temperature=1.0, top_k=None), run(seed=2, temperature=1.0, top_k=None))
    assert torch.equal(run(top_k=1, seed=5), run(greedy=True))


def test_sample_command_prints_prompt_and_continuation(tiny_checkpoint, capsys):
    argv = ["sample", str(tiny_checkpoint), "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", "8"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("Once upon a time")
    model, _ = load_model(tiny_checkpoint)
    tokenizer = get_tokenizer("gpt2")
    new = generate(model.eval(), torch.tensor([tokenizer.encode("Once upon a time").tolist()]),
                   SamplingSettings(max_new_tokens=8, greedy=True), eos_id=tokenizer.eos_id)[0].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    assert first == "Once upon a time" + tokenizer.decode(new) + "\n"


@pytest.mark.parametrize(("precision", "autocast_dtype"), [("bf16", torch.bfloat16), ("fp32", None),
                                                           ("auto", None)])  # auto: fp32 on the CPU
def test_sample_decodes_in_the_chosen_precision(precision, autocast_dtype, tiny_checkpoint, monkeypatch):
    seen = []

    def recording_generate(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording_generate)
    text = sampling.sample(str(tiny_checkpoint), "Once upon a time", SamplingSettings(max_new_tokens=4, greedy=True),
                           "cpu", precision=precision)
    assert seen == [autocast_dtype] and isinstance(text, str)


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "0"], "error: --temperature must be > 0 (use --greedy for argmax); got 0.0"),
    (["--max-new-tokens", "-1"], "error: --max-new-tokens must be >= 0; got -1"),
    (["--tokenizer", "bpe"],
     "error: unknown tokenizer 'bpe' (valid: gpt2, nt-6mer, dna-char, indirect-char, jsb-16th)"),
    (["--precision", "fp16"], "error: --precision must be auto, fp32 or bf16; got 'fp16'"),
])
def test_bad_sampling_options_give_one_line(args, message, tiny_checkpoint, capsys):
    assert main(["sample", str(tiny_checkpoint), "--prompt", "Hi", *args]) == 2
    assert capsys.readouterr().err == message + "\n"


PROBLEM = "oHBKRksDJOGxMCQIgXUEbwdWeL,e,+1="  # the answer is L


def test_sample_command_answers_an_indirect_problem(indirect_checkpoint, capsys):
    """A model trained on recipes/indirect.yaml: the prompt is encoded and the answer decoded with indirect-char."""
    argv = ["sample", str(indirect_checkpoint), "--prompt", PROBLEM, "--max-new-tokens", "1", "--greedy"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    model, cfg = load_model(indirect_checkpoint)
    tokenizer = get_tokenizer("indirect-char")
    assert cfg.data.tokenizer == "indirect-char" and resolve_tokenizer(cfg).name == "indirect-char"
    (answer,) = generate(model.eval(), torch.tensor([tokenizer.encode(PROBLEM).tolist()]),
                         SamplingSettings(max_new_tokens=1, greedy=True))[0].tolist()
    assert out == PROBLEM + tokenizer.decode([answer]) + "\n"
    assert main(["sample", str(indirect_checkpoint), "--max-new-tokens", "20", "--seed", "3"]) == 0
    assert set(capsys.readouterr().out.strip()) <= set("".join(tokenizer.vocab[2:]))


def test_an_invalid_prompt_character_gives_one_line(indirect_checkpoint, capsys):
    assert main(["sample", str(indirect_checkpoint), "--prompt", "abc?", "--greedy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: indirect-char tokenizer: invalid character '?' at position 3")
    assert err.count("\n") == 1


def test_the_task_tokenizers_are_found_from_the_manifest_or_the_vocabulary_size(tmp_path):
    from pope_lm.data import indirect

    cfg = RunConfig()
    cfg.data.dataset = str(tmp_path / "indirect")
    indirect.prepare_indirect(cfg.data.dataset, sizes={"train": 4, "val": 0, "test": 0}, shard_samples=4)
    assert resolve_tokenizer(cfg).name == "indirect-char"  # no data.tokenizer: the manifest names it
    cfg.data.dataset, cfg.model.vocab_size = str(tmp_path / "gone"), 90
    assert resolve_tokenizer(cfg).name == "jsb-16th"  # no manifest either: the only vocabulary of 90


def test_a_jsb_continuation_starts_on_the_line_after_the_prompts_last_step():
    tokenizer = get_tokenizer("jsb-16th")
    step = tokenizer.encode("B4 E4 B3 G#3").tolist()
    assert continuation_text(tokenizer, tokenizer.encode("C#5 E4 A3 A3").tolist(), step) == "\nB4 E4 B3 G#3"
    assert continuation_text(tokenizer, tokenizer.encode("C#5 E4").tolist(), step) == " B4 E4\nB3 G#3"
    assert continuation_text(tokenizer, [], step + step) == "B4 E4 B3 G#3\nB4 E4 B3 G#3"
    gpt2 = get_tokenizer("gpt2")
    assert continuation_text(gpt2, gpt2.encode("Once upon").tolist(), gpt2.encode(" a time").tolist()) == " a time"
