"""`pope-lm eval-length`: perplexity against context length, the paper's length-extrapolation protocol.

Models trained at 1024 tokens are scored on long documents (PG-19 test books in the paper) at lengths
1024 k, k = 1..10. At each length L every document is cut into non-overlapping windows of L + 1 tokens
(consecutive windows share one boundary token, so every token after a document's first is predicted at most
once per length), each window is scored in one forward pass, and the perplexity is exp(mean loss) over all
predicted tokens. The loss is also averaged per position bucket inside the window: where a RoPE model breaks
down past its training length shows there, while its perplexity at L averages over the good start.

Several checkpoints go into one CSV and one plot; RoPE checkpoints can be scored with a context-extension
method (pope_lm/rope_scaling.py). The model's own attention backend is used, so on CUDA PoPE runs the Triton
kernel (`auto`) and memory grows linearly with L.
"""

from __future__ import annotations

import csv
import glob
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pope_lm.config import ConfigError, RunConfig
from pope_lm.data.errors import DataError
from pope_lm.data.shards import MANIFEST, member_url, read_blocks, read_manifest
from pope_lm.data.tokenizers import Tokenizer
from pope_lm.model import GPT
from pope_lm.rope_scaling import SCALING_TYPES
from pope_lm.sampling import autocast_to, load_checkpoint, resolve_device, resolve_precision, resolve_tokenizer

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("pope_lm")

LENGTH_CSV = "length_ppl.csv"
POSITION_CSV = "position_loss.csv"
PLOT = "length_ppl.png"
CE_CHUNK = 2048  # positions per cross-entropy call: keeps the fp32 copy of (L, vocab) logits small at L = 10240


@dataclass
class ModelSpec:
    """One line of the comparison: a checkpoint, scored as trained or with a RoPE context extension."""

    checkpoint: Path
    rope_scaling: str = "none"  # none: as the checkpoint's config says
    scale_factor: float | None = None  # None: longest length / training length
    label: str | None = None


@dataclass
class LengthResult:
    label: str
    length: int
    windows: int
    tokens: int
    loss: float
    position_loss: np.ndarray = field(repr=False)  # (length,) mean loss at each position of the window

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan


@dataclass
class ModelResults:
    label: str
    checkpoint: Path
    position: str
    rope_scaling: str
    scale_factor: float
    train_len: int
    lengths: list[LengthResult]
    run_config: RunConfig = field(repr=False)


def parse_lengths(text: str) -> list[int]:
    """'1024,2048,4096' or 'start:stop:step' (stop included), e.g. '1024:10240:1024' for the paper's ten lengths."""
    try:
        if ":" in text:
            start, stop, step = (int(part) for part in text.split(":"))
            if step <= 0:
                raise ValueError
            lengths = list(range(start, stop + 1, step))
        else:
            lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--lengths must be positive integers 'a,b,c' or 'start:stop:step'; got '{text}'") from None
    if not lengths or min(lengths) <= 0:
        raise ConfigError(f"--lengths must be positive integers 'a,b,c' or 'start:stop:step'; got '{text}'")
    return sorted(set(lengths))


def expand_specs(checkpoints: Sequence[str], rope_scaling: str, scale_factor: str | None,
                 labels: str | None) -> list[ModelSpec]:
    """Per-checkpoint settings from the CLI options: each option is one value for all or one per checkpoint."""
    n = len(checkpoints)
    scalings = _per_checkpoint(rope_scaling, n, "--rope-scaling")
    for value in scalings:
        if value not in SCALING_TYPES:
            raise ConfigError(f"--rope-scaling must be one of {', '.join(SCALING_TYPES)}; got '{value}'")
    factors: list[float | None] = [None] * n
    if scale_factor:
        try:
            factors = [float(v) for v in _per_checkpoint(scale_factor, n, "--scale-factor")]
        except ValueError:
            raise ConfigError(f"--scale-factor must be a number >= 1; got '{scale_factor}'") from None
        if any(not f >= 1.0 for f in factors):  # also NaN
            raise ConfigError(f"--scale-factor must be a number >= 1; got '{scale_factor}'")
    names: list[str | None] = list(_per_checkpoint(labels, n, "--labels")) if labels else [None] * n
    return [ModelSpec(Path(c), s, f, lab) for c, s, f, lab in zip(checkpoints, scalings, factors, names, strict=True)]


def _per_checkpoint(value: str, n: int, option: str) -> list[str]:
    parts = [part.strip() for part in value.split(",")]
    if len(parts) == 1:
        return parts * n
    if len(parts) != n:
        raise ConfigError(f"{option} takes one value or one per checkpoint ({n}); got {len(parts)}: '{value}'")
    return parts


def load_scored_model(spec: ModelSpec, max_length: int, broadcast: bool) -> tuple[GPT, RunConfig, ModelSpec]:
    """The checkpoint's model, rebuilt with `spec.rope_scaling` when one is asked for.

    `broadcast`: the scaling was given once for all checkpoints, so PoPE/NoPE ones simply ignore it; given for
    this checkpoint alone, a scaling on a model without RoPE is a mistake.
    """
    model, cfg = load_checkpoint(spec.checkpoint)
    if spec.rope_scaling == "none":
        return model, cfg, spec
    if cfg.model.position != "rope":
        if broadcast:
            return model, cfg, ModelSpec(spec.checkpoint, "none", None, spec.label)
        raise ConfigError(f"--rope-scaling {spec.rope_scaling} needs a RoPE model; {spec.checkpoint} uses "
                          f"'{cfg.model.position}'")
    m = cfg.model
    if m.rope_scaling_type == "none":  # else it was fine-tuned with a scaling: keep the length it started from
        m.rope_original_max_len = cfg.data.seq_len
    factor = spec.scale_factor if spec.scale_factor is not None else max(1.0, max_length / m.rope_original_max_len)
    m.rope_scaling_type, m.rope_scaling_factor = spec.rope_scaling, factor
    scaled = GPT(m)  # only RoPE's frequency table and logit scale change; the weights are the same
    scaled.load_state_dict(model.state_dict())
    return scaled, cfg, ModelSpec(spec.checkpoint, spec.rope_scaling, factor, spec.label)


def load_documents(data: Sequence[str], tokenizer: Tokenizer, split: str = "test") -> list[np.ndarray]:
    """Token arrays of the documents in `data`: text files, globs, folders of .txt files or prepared datasets.

    A prepared dataset (a folder with manifest.json, see `pope-lm prepare`) contributes the documents of
    `split`, cut at the end-of-document id; it must use `tokenizer`. Every text file is one document.
    """
    documents: list[np.ndarray] = []
    for entry in data:
        path = Path(entry).expanduser()
        if (path / MANIFEST).is_file():
            documents.extend(_prepared_documents(str(path), tokenizer, split))
            continue
        matches = path.rglob("*.txt") if path.is_dir() else (Path(p) for p in glob.glob(entry, recursive=True))
        files = sorted(f for f in matches if f.is_file())
        if not files:
            raise ConfigError(f"--data '{entry}' matches no text file and is not a prepared dataset")
        for file in files:
            tokens = tokenizer.encode(file.read_text(encoding="utf-8", errors="replace"))
            if tokens.size:
                documents.append(tokens)
    return documents


def _prepared_documents(location: str, tokenizer: Tokenizer, split: str) -> Iterator[np.ndarray]:
    manifest = read_manifest(location)
    if manifest.tokenizer != tokenizer.name:
        raise ConfigError(f"{location} is tokenized with '{manifest.tokenizer}' but the model uses '{tokenizer.name}'")
    shards = manifest.split(split).shards
    if not shards:
        raise ConfigError(f"{location} has no '{split}' split (use --split)")
    dtype = np.dtype(manifest.dtype)
    pieces = []
    for shard in shards:
        blocks = list(read_blocks(member_url(location, shard.name), shard, manifest.block_len, dtype))
        pieces.append(np.concatenate(blocks)[: shard.tokens])  # the last block of a split is padded
    stream = np.concatenate(pieces)
    ends = np.flatnonzero(stream == manifest.eos_id)
    start = 0
    for end in [*ends.tolist(), stream.size]:
        if end > start:
            yield stream[start:end]
        start = end + 1


def windows(documents: Sequence[np.ndarray], length: int) -> Iterator[np.ndarray]:
    """Non-overlapping windows of length + 1 tokens (inputs and shifted targets), document by document."""
    for doc in documents:
        for start in range(0, doc.size - length, length):
            yield doc[start : start + length + 1]


@torch.no_grad()
def score_length(model: GPT, documents: Sequence[np.ndarray], length: int, label: str, device: torch.device,
                 dtype: torch.dtype, batch_size: int = 1, max_tokens: int | None = None) -> LengthResult:
    """Mean next-token loss over the windows of `length`, overall and at each position of the window.

    `max_tokens` stops once that many tokens are scored, so every length covers (nearly) the same leading text:
    a cap on windows instead would score 10x more text at 10240 than at 1024 and mix text with length.
    """
    position_sum = torch.zeros(length, dtype=torch.float64, device=device)
    count = 0
    batch: list[np.ndarray] = []
    autocast = autocast_to(dtype, device)

    def run(batch: list[np.ndarray]) -> None:
        block = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)
        with autocast:
            logits = model(block[:, :-1])
        targets = block[:, 1:]
        for s in range(0, length, CE_CHUNK):
            chunk = logits[:, s : s + CE_CHUNK].float()
            loss = F.cross_entropy(chunk.flatten(0, 1), targets[:, s : s + CE_CHUNK].flatten(), reduction="none")
            position_sum[s : s + CE_CHUNK] += loss.view(len(batch), -1).double().sum(0)

    for window in windows(documents, length):
        if max_tokens is not None and count * length >= max_tokens:
            break
        batch.append(window)
        count += 1
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if count == 0:  # every document is shorter than length + 1 tokens
        return LengthResult(label, length, 0, 0, math.nan, np.full(length, math.nan))
    position_loss = (position_sum / count).cpu().numpy()
    return LengthResult(label, length, count, count * length, float(position_loss.mean()), position_loss)


@dataclass
class EvalSettings:
    lengths: list[int]
    data: list[str]
    out: Path
    split: str = "test"
    batch_size: int = 1
    max_tokens: int | None = None  # None: every window
    bucket_size: int | None = None  # None: longest length / 32
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    tokenizer: str | None = None


def evaluate_lengths(specs: Sequence[ModelSpec], settings: EvalSettings) -> list[ModelResults]:
    """Score every model at every length; write the CSVs and the plot into `settings.out`."""
    if settings.batch_size <= 0 or (settings.max_tokens is not None and settings.max_tokens <= 0):
        raise ConfigError("--batch-size and --max-tokens must be positive")
    for spec in specs:  # a file, or the directory of a ZeRO checkpoint
        if not spec.checkpoint.exists():
            raise ConfigError(f"checkpoint not found: {spec.checkpoint}")
    device = resolve_device(settings.device)
    dtype = resolve_precision(settings.precision, device)
    broadcast = len({spec.rope_scaling for spec in specs}) == 1
    documents: dict[str, list[np.ndarray]] = {}  # per tokenizer name
    results: list[ModelResults] = []
    for spec in specs:
        model, cfg, spec = load_scored_model(spec, max(settings.lengths), broadcast)
        model.to(device).eval()
        tokenizer = resolve_tokenizer(cfg, settings.tokenizer)
        if tokenizer.name not in documents:
            try:
                documents[tokenizer.name] = load_documents(settings.data, tokenizer, settings.split)
            except DataError as exc:
                raise ConfigError(str(exc)) from None
        label = spec.label or _default_label(cfg, spec, [r.label for r in results])
        per_length = []
        for length in settings.lengths:
            result = score_length(model, documents[tokenizer.name], length, label, device, dtype,
                                  settings.batch_size, settings.max_tokens)
            log.info("%s  L=%d: ppl %.3f over %d windows (%d tokens)", label, length, result.ppl, result.windows,
                     result.tokens)
            per_length.append(result)
        m = cfg.model
        scaling, factor = (m.rope_scaling_type, m.rope_scaling_factor) if m.position == "rope" else ("none", 1.0)
        results.append(ModelResults(label, spec.checkpoint, m.position, scaling, factor, cfg.data.seq_len, per_length,
                                    cfg))
        del model
    if all(r.windows == 0 for m in results for r in m.lengths):
        raise ConfigError(f"no document in --data is longer than {min(settings.lengths)} tokens")
    bucket = settings.bucket_size or max(1, max(settings.lengths) // 32)
    settings.out.mkdir(parents=True, exist_ok=True)
    write_length_csv(results, settings.out / LENGTH_CSV)
    write_position_csv(results, settings.out / POSITION_CSV, bucket)
    plot_results(results, settings.out / PLOT, bucket)
    return results


def _default_label(cfg: RunConfig, spec: ModelSpec, taken: list[str]) -> str:
    label = f"{cfg.name} ({cfg.model.position}"
    if cfg.model.position == "rope" and cfg.model.rope_scaling_type != "none":
        label += f"+{cfg.model.rope_scaling_type} x{cfg.model.rope_scaling_factor:g}"
    label += ")"
    if label in taken:
        label += f" {spec.checkpoint.stem}"
    return label


def write_length_csv(results: Sequence[ModelResults], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "checkpoint", "position", "rope_scaling", "scale_factor", "train_len", "length",
                         "windows", "tokens", "loss", "ppl"])
        for m in results:
            for r in m.lengths:
                writer.writerow([m.label, str(m.checkpoint), m.position, m.rope_scaling, f"{m.scale_factor:g}",
                                 m.train_len, r.length, r.windows, r.tokens, f"{r.loss:.6f}", f"{r.ppl:.4f}"])


def position_buckets(result: LengthResult, bucket: int) -> list[tuple[int, int, float]]:
    """(start, end, mean loss) over consecutive position ranges of `bucket` tokens (the last one may be shorter)."""
    loss = result.position_loss
    return [(s, min(s + bucket, loss.size), float(loss[s : s + bucket].mean())) for s in range(0, loss.size, bucket)]


def write_position_csv(results: Sequence[ModelResults], path: Path, bucket: int) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "length", "bucket_start", "bucket_end", "loss", "windows"])
        for m in results:
            for r in m.lengths:
                for start, end, loss in position_buckets(r, bucket):
                    writer.writerow([m.label, r.length, start, end, f"{loss:.6f}", r.windows])


def plot_results(results: Sequence[ModelResults], path: Path, bucket: int) -> None:
    """Left: perplexity against context length (log scale: RoPE blows up by orders of magnitude), one line per
    model, the training lengths marked. Right: mean loss against position inside the longest window scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for m in results:
        scored = [r for r in m.lengths if r.windows]
        left.plot([r.length for r in scored], [r.ppl for r in scored], marker="o", label=m.label)
        if scored:
            longest = scored[-1]
            buckets = position_buckets(longest, bucket)
            right.plot([(s + e) / 2 for s, e, _ in buckets], [loss for _, _, loss in buckets],
                       label=f"{m.label}, L={longest.length}")
    for train_len in sorted({m.train_len for m in results}):
        for axis in (left, right):
            axis.axvline(train_len, color="grey", linestyle="--", linewidth=1)
        left.annotate(f"trained at {train_len}", (train_len, 0), xycoords=("data", "axes fraction"),
                      xytext=(4, 6), textcoords="offset points", color="grey", fontsize=9)
    left.set(xlabel="context length (tokens)", ylabel="perplexity", yscale="log", title="Perplexity vs context length")
    right.set(xlabel="position in the window (tokens)", ylabel=f"mean loss (nats, buckets of {bucket})",
              title="Loss vs position at the longest length")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(results: Sequence[ModelResults], settings: EvalSettings, tracking_uri: str, experiment: str,
                  parent_run_id: str | None = None) -> str:
    """One MLflow run 'eval-length' holding per-model metrics (step = context length) and the CSVs and plot."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = experiment_id_for(client, experiment, tracking_uri)
    tags = {"pope_lm.task": "eval-length"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name="eval-length", tags=tags)
    run_id = run.info.run_id
    client.log_param(run_id, "lengths", ",".join(map(str, settings.lengths)))
    client.log_param(run_id, "data", ",".join(settings.data)[:6000])
    for i, m in enumerate(results):
        client.log_param(run_id, f"model_{i}", f"{m.label} = {m.checkpoint}"[:6000])
        key = _metric_key(m.label)
        for r in m.lengths:
            if r.windows:
                client.log_metric(run_id, f"ppl/{key}", r.ppl, step=r.length)
                client.log_metric(run_id, f"loss/{key}", r.loss, step=r.length)
    for name in (LENGTH_CSV, POSITION_CSV, PLOT):
        client.log_artifact(run_id, str(settings.out / name), artifact_path="eval-length")
    client.set_terminated(run_id)
    return run_id


def find_tracking_store(checkpoint: Path, cfg: RunConfig) -> str | None:
    """The MLflow store a checkpoint's training run logged to, when it can still be found.

    Training writes `<run_dir>/checkpoints/step-*.ckpt` next to `<run_dir>/mlflow.db`; the run directory is
    taken from the checkpoint's location first (the run may have moved), then from its config.
    """
    if not cfg.tracking.enabled:
        return None
    if cfg.tracking.uri:
        return cfg.tracking.uri
    candidates = [checkpoint.resolve().parent.parent, cfg.resolved_run_dir]
    for run_dir in candidates:
        if (run_dir / "mlflow.db").is_file():
            return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    return None


def experiment_id_for(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it if needed; in a SQLite store its artifacts go beside the database (as
    training puts them) rather than into ./mlruns of whatever directory the command ran in."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _metric_key(label: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces: other runs of characters become one _."""
    return re.sub(r"[^A-Za-z0-9_\-. ]+", "_", label).strip("_ ") or "model"


def eval_length(checkpoints: Sequence[str], settings: EvalSettings, rope_scaling: str = "none",
                scale_factor: str | None = None, labels: str | None = None, tracking_uri: str | None = None,
                experiment: str | None = None, tracking: bool = True) -> list[ModelResults]:
    """The `pope-lm eval-length` command: score, write CSVs and plot, and log them to MLflow.

    MLflow: `tracking_uri` when given, else the store of the first checkpoint's training run (when tracking was
    on and its store is found); the run is nested under that checkpoint's training run when it has one there.
    """
    from pope_lm.checkpointing import checkpoint_state
    from pope_lm.tracking import RUN_ID_KEY

    specs = expand_specs(checkpoints, rope_scaling, scale_factor, labels)
    results = evaluate_lengths(specs, settings)
    if not tracking:
        return results
    first, cfg = specs[0].checkpoint, results[0].run_config
    uri = tracking_uri or find_tracking_store(first, cfg)
    if uri is None:
        log.info("MLflow: no store found for %s; pass --tracking-uri to log the results", first)
        return results
    parent = None
    if uri == find_tracking_store(first, cfg):
        parent = checkpoint_state(first).get(RUN_ID_KEY)
    run_id = log_to_mlflow(results, settings, uri, experiment or cfg.tracking.experiment, parent)
    log.info("MLflow: run %s in %s", run_id, uri)
    return results
