"""Typed run configuration: dataclasses checked by omegaconf, filled from a YAML recipe and key=value overrides.

A recipe only states what differs from the defaults below. `load_config` turns every mistake a user can
make (missing file, unknown key, wrong type, impossible value) into a `ConfigError` whose message is one
line naming the offending key; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pope_lm.model_config import ModelConfig  # re-exported: it lives in a dependency-free module for export-hf


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is a single line."""


@dataclass
class DataConfig:
    # A prepared dataset (see `pope-lm prepare`): a directory holding manifest.json, a URL prefix that webdataset
    # opens (https://host/owt), a template with {name} (pipe:aws s3 cp s3://bucket/owt/{name} -), or the name of
    # a built-in corpus ('shakespeare') that is prepared into cache_dir on first use.
    dataset: str = "shakespeare"
    cache_dir: str = "~/.cache/pope-lm"
    seq_len: int = 1024  # tokens per training sequence (each sample holds seq_len + 1 tokens)
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # samples shuffled together (consecutive chunks of a shard; 0 or 1: in order)
    val_batches: int = 20  # validation batches per evaluation, streamed in order without shuffle
    tokenizer: str = ""  # expected tokenizer id of the dataset (a name in data/tokenizers.py); "" accepts any
    skip_corrupt: bool = False  # skip (and count) a corrupt or unreadable shard instead of stopping
    layout_change: str = "refuse"  # resuming with other ranks/workers/batch/seq_len: refuse | next_epoch
    # Streams of shard visits. 0: one per (rank, worker) slot, so which samples form a step depends on the world
    # size. N: N streams in one global order, the same steps on any ranks x workers that divides N (docs/data.md).
    streams: int = 0


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 1000
    decay_steps: int = 0  # the cosine reaches min_lr at this step and stays there; 0: at trainer.max_steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01  # applied to matrices and embeddings only
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 100_000  # optimizer steps; the cosine schedule decays to min_lr at this step
    global_batch_size: int = 64  # sequences per optimizer step, over all ranks and accumulation steps
    # Sequences per forward/backward on one device, or auto: the largest that divides global_batch_size / world size
    # and fits the GPU, found by probing training steps (on the CPU: the largest not above 8; pope_lm/batch_size.py)
    micro_batch_size: int | str = 8
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | deepspeed (GPUs); one process runs ddp and ZeRO-1/2 single-device
    zero_stage: int = 2  # deepspeed: ZeRO shards 1 optimizer states, 2 + gradients, 3 + parameters over the ranks
    offload_optimizer: bool = False  # deepspeed: optimizer states and fp32 master weights in CPU memory
    offload_params: bool = False  # deepspeed with zero_stage 3: parameters in CPU memory between uses
    deepspeed_config: str = ""  # deepspeed: JSON file merged over the DeepSpeed config generated from the recipe
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU; or any Lightning precision string
    # fp32 matrix products on GPU (torch.set_float32_matmul_precision): high runs them on the tensor cores in TF32
    # (those autocast leaves in fp32 under bf16-mixed; all of them under 32-true), highest in full fp32
    matmul_precision: str = "high"
    val_every_n_steps: int = 1000
    test_at_end: bool = True  # score the dataset's test split, where it has one, once training ends
    test_on: str = "last"  # the weights the test split scores: last | best (needs checkpoint.keep_best)
    max_time: str = ""  # "DD:HH:MM:SS": end training (checkpoint, test) after this wall time; "" = no limit
    log_every_n_steps: int = 10
    # torch.compile the model; null (the default): on GPU, except under DeepSpeed ZeRO-3 (which gathers parameters
    # in hooks around each module's forward; compiling it is untried, set true to try)
    compile: bool | None = None
    # torch.compile's mode: reduce-overhead replays each step's kernels as CUDA graphs, which pays off where
    # kernel launches, not arithmetic, bound the step (small models, short sequences: recipes/indirect.yaml, and
    # recipes/124m.yaml, which sets it)
    compile_mode: str = "default"
    peak_tflops: float = 0.0  # device peak for MFU; 0 picks it from the device name when known
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000
    keep_last: int = 3  # newest complete checkpoints kept on disk
    keep_best: bool = False  # also keep best.ckpt: the weights at the validation with the lowest val/loss so far
    # write files from a background thread: training waits only for a copy of the state in host memory (one full
    # state held there until written); false: write in the training loop. DeepSpeed writes its shards itself, always
    # in the loop.
    background_write: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: sqlite:///<run_dir>/mlflow.db with artifacts beside it; or http://host:port
    experiment: str = "pope-lm"
    run_name: str = ""  # empty: the run directory's name


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = ""  # empty: runs/<name>
    seed: int = 1337
    resume: str = ""  # "" (fresh run) | auto (newest complete checkpoint in run_dir) | path to a checkpoint
    # Fine-tuning: start a fresh run (step 0, new optimizer and schedule) from this checkpoint's weights.
    # Ignored when the run resumes from its own checkpoint.
    init_from: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


_CHOICES = {
    "model.position": ("pope", "rope", "none"),
    "model.activation": ("gelu", "gelu_tanh"),
    "model.delta_init": ("zero", "uniform"),
    "model.attention_backend": ("auto", "reference", "triton"),
    "model.rope_scaling_type": ("none", "pi", "ntk", "yarn"),
    "trainer.accelerator": ("auto", "cpu", "gpu"),
    "trainer.strategy": ("auto", "ddp", "deepspeed"),
    "trainer.test_on": ("last", "best"),
    "trainer.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "trainer.matmul_precision": ("highest", "high", "medium"),
}


def load_config(recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Merge the defaults, a YAML recipe and `key=value` overrides into a checked RunConfig."""
    cfg: DictConfig = OmegaConf.structured(RunConfig)
    layers: list[tuple[str, DictConfig]] = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as exc:  # YAML syntax errors come in many exception types
            raise ConfigError(f"cannot parse recipe {path}: {_one_line(exc)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse override '{item}': {_one_line(exc)}") from None
    for origin, layer in layers:
        _check_keys(layer, RunConfig, "", origin)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ValidationError as exc:
            key = exc.full_key or "?"
            raise ConfigError(f"wrong type for '{key}' in {origin}: {_type_message(exc)}") from None
        except (ConfigKeyError, ConfigAttributeError) as exc:
            raise ConfigError(f"unknown key '{exc.full_key}' in {origin}") from None
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(run)
    return run


def validate(cfg: RunConfig) -> None:
    """Value checks that types cannot express; each failure names its key."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"'{key}' must be one of {', '.join(choices)}; got '{value}'")
    m = cfg.model
    positive = {
        "model.vocab_size": m.vocab_size, "model.n_layer": m.n_layer, "model.n_head": m.n_head,
        "model.head_dim": m.head_dim, "model.d_model": m.d_model, "data.seq_len": cfg.data.seq_len,
        "trainer.max_steps": cfg.trainer.max_steps,
        "trainer.global_batch_size": cfg.trainer.global_batch_size, "trainer.devices": cfg.trainer.devices,
        "trainer.num_nodes": cfg.trainer.num_nodes, "checkpoint.every_n_steps": cfg.checkpoint.every_n_steps,
        "checkpoint.keep_last": cfg.checkpoint.keep_last, "trainer.val_every_n_steps": cfg.trainer.val_every_n_steps,
        "trainer.log_every_n_steps": cfg.trainer.log_every_n_steps, "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive; got {value}")
    if m.n_head * m.head_dim != m.d_model:
        raise ConfigError(
            f"'model.n_head' x 'model.head_dim' must equal 'model.d_model'; "
            f"got {m.n_head} x {m.head_dim} != {m.d_model}"
        )
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"'model.head_dim' must be even for rope; got {m.head_dim}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"'model.dropout' must be in [0, 1); got {m.dropout}")
    if not 0.0 <= cfg.optim.min_lr <= cfg.optim.lr:
        raise ConfigError(f"'optim.min_lr' must be in [0, optim.lr]; got {cfg.optim.min_lr}")
    if cfg.optim.warmup_steps < 0 or cfg.optim.grad_clip < 0 or cfg.optim.weight_decay < 0:
        raise ConfigError("'optim.warmup_steps', 'optim.grad_clip' and 'optim.weight_decay' must be >= 0")
    if cfg.optim.decay_steps and cfg.optim.decay_steps <= cfg.optim.warmup_steps:
        raise ConfigError(f"'optim.decay_steps' must be 0 (decay until trainer.max_steps) or more than "
                          f"'optim.warmup_steps' ({cfg.optim.warmup_steps}); got {cfg.optim.decay_steps}")
    if not math.isfinite(m.theta) or m.theta <= 1.0:
        raise ConfigError(f"'model.theta' must be a finite number > 1; got {m.theta}")
    if m.rope_scaling_factor < 1.0:
        raise ConfigError(f"'model.rope_scaling_factor' must be >= 1; got {m.rope_scaling_factor}")
    if m.rope_original_max_len <= 0:
        raise ConfigError(f"'model.rope_original_max_len' must be positive; got {m.rope_original_max_len}")
    if m.attention_backend == "triton" and m.position == "pope" and m.head_dim not in (32, 64, 128):
        raise ConfigError(f"'model.attention_backend' triton supports head_dim 32, 64 or 128; got {m.head_dim} "
                          "(use auto, which falls back to the reference backend)")
    t = cfg.trainer
    if t.micro_batch_size != "auto" and not (isinstance(t.micro_batch_size, int) and t.micro_batch_size > 0):
        raise ConfigError(f"'trainer.micro_batch_size' must be a positive integer or auto; got {t.micro_batch_size!r}")
    if t.zero_stage not in (1, 2, 3):
        raise ConfigError(f"'trainer.zero_stage' must be one of 1, 2, 3; got {t.zero_stage}")
    if t.strategy != "deepspeed" and (t.offload_optimizer or t.offload_params or t.deepspeed_config):
        raise ConfigError("'trainer.offload_optimizer', 'trainer.offload_params' and 'trainer.deepspeed_config' "
                          f"need trainer.strategy=deepspeed; got '{t.strategy}'")
    if t.test_on == "best" and not cfg.checkpoint.keep_best:
        raise ConfigError("'trainer.test_on' best needs checkpoint.keep_best=true")
    if t.max_time and not re.fullmatch(r"\d+:\d{2}:\d{2}:\d{2}", t.max_time):
        raise ConfigError(f"'trainer.max_time' must read DD:HH:MM:SS; got '{t.max_time}'")
    if t.offload_params and t.zero_stage != 3:
        raise ConfigError(f"'trainer.offload_params' needs trainer.zero_stage=3 (the stage that partitions "
                          f"parameters); got {t.zero_stage}")


def config_to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_container(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain dicts and scalars (what a checkpoint stores)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def config_from_container(container: dict[str, Any]) -> RunConfig:
    """Rebuild a checked RunConfig from `config_to_container`'s output (e.g. read from a checkpoint)."""
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), container)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """{'model.n_layer': 12, ...}: the form MLflow params take."""
    return _flatten(config_to_container(cfg), "")


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def _check_keys(layer: Any, schema: type, prefix: str, origin: str) -> None:
    """Reject unknown keys before merging so the message can list the valid ones and suggest the closest."""
    if not isinstance(layer, DictConfig):
        return
    valid = {f.name: f.type for f in fields(schema)}
    for key in layer:
        name = str(key)
        if name not in valid:
            hint = difflib.get_close_matches(name, list(valid), n=1)
            suggestion = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"unknown key '{prefix}{name}' in {origin}{suggestion} (valid keys: {', '.join(valid)})"
            )
        sub = next(f for f in fields(schema) if f.name == name)
        sub_type = sub.default_factory if callable(sub.default_factory) else None  # type: ignore[misc]
        if sub_type is not None and is_dataclass(sub_type):
            child = layer[name]
            if child is not None and not isinstance(child, DictConfig):
                raise ConfigError(f"'{prefix}{name}' in {origin} must be a section (a mapping), got '{child}'")
            _check_keys(child, sub_type, f"{prefix}{name}.", origin)  # type: ignore[arg-type]


def _type_message(exc: ValidationError) -> str:
    text = _one_line(exc)
    return text.split("\n")[0]


def _one_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return first[0] if first else type(exc).__name__
