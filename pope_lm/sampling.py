"""`pope-lm sample`: quick generations from a native checkpoint, decoding with the model's KV cache.

Also home of the helpers every inference tool shares (sample, eval-length, export-hf): which tokenizer a
checkpoint was trained with, which device to run on, and in which precision.
"""

from __future__ import annotations

import pickle
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from pope_lm.config import ConfigError, RunConfig
from pope_lm.data.errors import DataError
from pope_lm.data.shards import MANIFEST, read_manifest
from pope_lm.data.tokenizers import TOKENIZERS, Tokenizer, get_tokenizer
from pope_lm.model import GPT


def resolve_tokenizer(cfg: RunConfig, name: str | None = None) -> Tokenizer:
    """The tokenizer `name`, or else the one the checkpoint was trained with.

    That is `data.tokenizer` when the run set it; otherwise the training dataset's manifest names it when that
    directory is still there, else the vocabulary size decides when exactly one tokenizer has it.
    """
    name = name or cfg.data.tokenizer
    if name:
        if name not in TOKENIZERS:
            raise ConfigError(f"unknown tokenizer '{name}' (valid: {', '.join(TOKENIZERS)})")
        return get_tokenizer(name)
    dataset = Path(cfg.data.dataset).expanduser()
    if (dataset / MANIFEST).is_file():
        try:
            return get_tokenizer(read_manifest(str(dataset)).tokenizer)
        except DataError:
            pass  # an unreadable manifest only loses this hint; the vocabulary size may still decide
    matches = [n for n in TOKENIZERS if get_tokenizer(n).vocab_size == cfg.model.vocab_size]
    if len(matches) == 1:
        return get_tokenizer(matches[0])
    raise ConfigError(
        f"cannot tell the tokenizer of this checkpoint (dataset '{cfg.data.dataset}', vocabulary "
        f"{cfg.model.vocab_size}); pass --tokenizer ({', '.join(TOKENIZERS)})"
    )


def load_checkpoint(path: str | Path) -> tuple[GPT, RunConfig]:
    """`load_model` with every way a file can fail to be a readable pope-lm checkpoint as one ConfigError line.

    load_model already names a missing file and a file without a pope-lm config; this adds files torch cannot
    read (not a checkpoint, truncated) and weights that do not fit the stored architecture.
    """
    from pope_lm.checkpointing import load_model

    try:
        return load_model(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__  # one line; state-dict errors span several
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        raise ConfigError(f"cannot load {path} as a pope-lm checkpoint: {reason}") from None


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one; asking for CUDA without one is a user error, not a traceback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but no CUDA device is available")
    return torch.device(name)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA, where fp32 would send attention to the slower fp32 kernel tiles, and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in PRECISIONS:
        raise ConfigError(f"--precision must be auto, fp32 or bf16; got '{name}'")
    return PRECISIONS[name]


def autocast_to(dtype: torch.dtype, device: torch.device) -> AbstractContextManager:
    """The forward's precision context: bf16 autocast keeps the fp32 weights and norms, as training does."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


@dataclass
class SamplingSettings:
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 200  # None: the whole vocabulary
    greedy: bool = False  # argmax at every step (temperature and top_k are then unused)
    seed: int = 1337

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0; got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0 (use --greedy for argmax); got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError(f"--top-k must be positive; got {self.top_k}")


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, settings: SamplingSettings, eos_id: int | None = None
             ) -> torch.Tensor:
    """Continue `prompt` (B, T) by up to `settings.max_new_tokens` tokens; returns only the new tokens (B, N).

    The prompt runs through the model once; every further step feeds one token and reuses the cached raw keys
    and values (`GPT.forward_with_cache`), so a step costs O(context) instead of O(context^2). Stops early once
    every row has produced `eos_id`.
    """
    generator = torch.Generator(device=prompt.device).manual_seed(settings.seed)
    logits, caches = model.forward_with_cache(prompt)
    new_tokens: list[torch.Tensor] = []
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for step in range(settings.max_new_tokens):
        token = _pick(logits[:, -1].float(), settings, generator)
        new_tokens.append(token)
        if eos_id is not None:
            finished |= token == eos_id
            if bool(finished.all()):
                break
        if step + 1 < settings.max_new_tokens:
            logits, caches = model.forward_with_cache(token[:, None], caches)
    if not new_tokens:
        return prompt.new_empty(prompt.shape[0], 0)
    return torch.stack(new_tokens, dim=1)


def _pick(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_k is not None and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample(checkpoint: str, prompt: str, settings: SamplingSettings, device: str = "auto",
           tokenizer_name: str | None = None, precision: str = "auto") -> str:
    """Load a native checkpoint and return the prompt's continuation as text (the prompt itself excluded)."""
    settings.check()
    target = resolve_device(device)
    dtype = resolve_precision(precision, target)
    model, cfg = load_checkpoint(checkpoint)
    model.to(target)
    tokenizer = resolve_tokenizer(cfg, tokenizer_name)
    ids = tokenizer.encode(prompt).tolist() if prompt else [tokenizer.eos_id]  # no prompt: start a new document
    idx = torch.tensor([ids], dtype=torch.long, device=target)
    with autocast_to(dtype, target):
        new = generate(model.eval(), idx, settings, eos_id=tokenizer.eos_id)[0].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return continuation_text(tokenizer, ids if prompt else [], new)


def continuation_text(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text that `new` adds after `prompt`: decoded together with the prompt, then the prompt's text cut off.

    For most tokenizers that is `decode(new)`; a tokenizer whose text has separators or layout that depend on
    the tokens before (jsb-16th: a space between voices, a line per 16th-note step) gets them right this way,
    e.g. the newline that ends the prompt's last step.
    """
    head, whole = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new)
