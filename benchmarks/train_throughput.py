"""Training throughput of pope-lm against its peers, measured in one run on one GPU.

For each recipe (124m, 774m by default) and the same micro-batch, it times 30 optimizer steps after warm-up:

  pope-triton     pope-lm PoPE, Triton kernel, torch.compile, bf16, fused AdamW (bare loop)
  pope-lightning  the same module driven by a Lightning Trainer with the recipe's strategy, as `pope-lm train` builds
                  it (Lightning's overhead = this vs pope-triton)
  pope-lightning-ddp  the same under Lightning's DDP with one process: what DDP costs each rank besides its
                  all-reduces (gradient buckets, the compiled graph split at them); what `ddp` recipes ran on one
                  GPU before `build_strategy` made that single-device
  rope            pope-lm with RoPE (SDPA), compiled
  pope-reference  pope-lm PoPE through the plain-torch reference backend (materialized q', k' + SDPA), compiled
  nanogpt         a plain nanoGPT-style GPT-2 of the same size (LayerNorm, learned positions, SDPA), compiled

and reports tokens/s, MFU (each model's own FLOPs per token: PoPE's Q K^T counted at width 2D; peak 989
TFLOP/s bf16 for H100/H200 unless --peak-tflops), peak memory and the card's memory in use outside PyTorch's
allocator, with the local memory CUDA reserves for spilling kernels. Data are random token blocks already on the
GPU, so the numbers measure the model, optimizer and loop, not the input pipeline.

    python benchmarks/train_throughput.py --recipes 124m 774m --out results.json
    python benchmarks/train_throughput.py --recipes 124m --seq-len 64 128 256 512 1024 \
        --variants pope-triton pope-reference rope     # where the kernel overtakes the reference (`auto`'s limit)
    python benchmarks/train_throughput.py --smoke     # a few CPU steps of a tiny model, to check the script
    python benchmarks/train_throughput.py --recipes 124m --variants pope-triton rope --profile 3
                                                      # + where each bare-loop step's GPU time goes, by kernel
    python benchmarks/train_throughput.py --recipes 124m 124m:model.fp32_residual=true --variants pope-triton
                                                      # a recipe with overrides (key=value, comma-separated)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from pope_lm.batch_size import resolve_micro_batch_size
from pope_lm.config import ConfigError, ModelConfig, RunConfig, load_config
from pope_lm.lit_module import LitGPT
from pope_lm.model import GPT, padded_vocab_size
from pope_lm.monitoring import peak_flops
from pope_lm.strategy import build_strategy, resolve_strategy


class NanoGPT(nn.Module):
    """The plain PyTorch peer: GPT-2 as in nanoGPT (LayerNorm with bias, learned positions, SDPA, tied head)."""

    def __init__(self, cfg: ModelConfig, seq_len: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.wte = nn.Embedding(padded_vocab_size(cfg.vocab_size), d)
        self.wpe = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
                "ln2": nn.LayerNorm(d), "fc": nn.Linear(d, 4 * d), "out": nn.Linear(4 * d, d),
            })
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, t, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self, seq_len: int) -> float:
        n_params = sum(p.numel() for p in self.parameters())
        return 6.0 * n_params + 12 * len(self.blocks) * self.wte.embedding_dim * seq_len


@dataclass
class Result:
    recipe: str
    variant: str
    micro_batch: int
    ms_per_step: float
    tokens_per_s: float
    mfu: float
    peak_gib: float
    # The card's memory in use (cudaMemGetInfo, by every process on it) minus what PyTorch's caching allocator holds:
    # the CUDA context, library workspaces, loaded kernels and the local memory of spilling ones. It accumulates over
    # a process's variants, so only the first row is the variant's own.
    outside_allocator_gib: float
    # Of that, the local memory (spills, stacks) CUDA reserves: the largest per-thread size any kernel launched so far
    # needed, for every thread the card can hold at once. The driver grows it on launch and never shrinks it.
    local_memory_gib: float


def random_batches(n: int, batch: int, seq_len: int, vocab: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(device) for _ in range(n)]


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda" or None)


def time_bare_loop(model: nn.Module, batches: list[torch.Tensor], warmup: int, steps: int,
                   device: torch.device, profile_steps: int = 0, compile_mode: str = "default") -> float:
    """Seconds per optimizer step of a plain training loop (bf16 autocast on CUDA, clipping, fused AdamW);
    with profile_steps, then prints where that many more steps spent their GPU time (`print_kernel_profile`)."""
    optimizer = make_optimizer(model, 1e-4, device)
    step_fn = torch.compile(model, mode=compile_mode) if device.type == "cuda" else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def one_step(i: int) -> None:
        batch = batches[i % len(batches)]
        with autocast:
            loss = step_fn(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        one_step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        one_step(i)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    if profile_steps and device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(profile_steps):
                one_step(i)
            _sync(device)
        print_kernel_profile(prof.events(), profile_steps, seconds)
    return seconds


# Kernel-name patterns of the step's parts, first match wins (Gluon/Triton PoPE kernels keep their Python names)
KERNEL_GROUPS = (
    ("pope attention", re.compile(r"_(fwd|dq|dkdv|softplus|dvec|dq_finish)_kernel")),
    ("sdpa attention", re.compile(r"cudnn|fmha|flash|attention", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|sm90_", re.IGNORECASE)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|norm_kernel", re.IGNORECASE)),
    ("compiled elementwise", re.compile(r"^triton_")),
)


def print_kernel_profile(events: list, steps: int, step_seconds: float, min_share: float = 0.002) -> None:
    """GPU time per step by part, and by kernel for every kernel with at least `min_share` of it, against the timed
    wall time per step (busy < wall: host-bound)."""
    per_kernel: dict[str, list[float]] = {}
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals = per_kernel.setdefault(event.name, [0.0, 0.0])
            totals[0] += event.device_time_total / 1e3 / steps
            totals[1] += 1 / steps
    groups: dict[str, float] = {}
    for name, (ms, _) in per_kernel.items():
        group = next((g for g, pattern in KERNEL_GROUPS if pattern.search(name)), "other")
        groups[group] = groups.get(group, 0.0) + ms
    busy = sum(groups.values())
    print(f"  GPU busy {busy:.2f} ms per step of {step_seconds * 1e3:.2f} ms wall; by part: "
          + ", ".join(f"{g} {ms:.2f}" for g, ms in sorted(groups.items(), key=lambda item: -item[1])), flush=True)
    for name, (ms, calls) in sorted(per_kernel.items(), key=lambda item: -item[1][0]):
        if ms < min_share * busy:
            break
        print(f"  {ms:7.3f} ms {calls:5.0f} x  {name[:110]}", flush=True)


class _StepTimer(L.Callback):
    """Wall time of `steps` optimizer steps after `warmup`, synchronized at both ends; then, with `profile_steps`, where
    that many more steps spent their GPU time (`print_kernel_profile`), as `time_bare_loop` does."""

    def __init__(self, warmup: int, steps: int, profile_steps: int = 0) -> None:
        self.warmup, self.steps, self.profile_steps = warmup, steps, profile_steps
        self.start = 0.0
        self.end = 0.0
        self._profiler: torch.profiler.profile | None = None

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            _sync(trainer.strategy.root_device)
            self.start = time.perf_counter()
        elif trainer.global_step == self.warmup + self.steps:  # only reached with profile_steps
            self._stop_clock(trainer)
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._profiler.__enter__()

    def on_train_end(self, trainer: L.Trainer, *args: object) -> None:
        if self._profiler is None:
            self._stop_clock(trainer)
            return
        _sync(trainer.strategy.root_device)
        self._profiler.__exit__(None, None, None)
        print_kernel_profile(self._profiler.events(), self.profile_steps, self.seconds_per_step)

    def _stop_clock(self, trainer: L.Trainer) -> None:
        _sync(trainer.strategy.root_device)
        self.end = time.perf_counter()


class _SyncProbe(L.Callback):
    """Records where the host waits for the GPU during two warm-up steps (CUDA sync debug mode).

    A step without synchronizations lets the host queue the next step while the GPU works, which hides Lightning's
    Python overhead; each site found here exposes it. Prints every site with its count, as the innermost frame
    (file:line) <- the innermost pope_lm or lightning frame that led to it.
    """

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.sites: dict[str, int] = {}
        self._catcher: warnings.catch_warnings | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.first and self._catcher is None:
            self._catcher = warnings.catch_warnings()
            self._catcher.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record  # type: ignore[assignment]
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step == self.last and self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None
            print(f"host-device synchronizations in steps {self.first}..{self.last - 1}: "
                  f"{sum(self.sites.values())} {self.sites}", flush=True)

    def _record(self, message: object, *args: object, **kwargs: object) -> None:
        if "synchroniz" not in str(message):
            return
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        ours = [f for f in stack if "pope_lm" in f.filename or "lightning" in f.filename] or stack
        site = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in (stack[-1], ours[-1]))
        self.sites[site] = self.sites.get(site, 0) + 1


def time_lightning(cfg: RunConfig, batches: list[torch.Tensor], warmup: int, steps: int,
                   device: torch.device, profile_steps: int = 0, strategy: str | None = None) -> float:
    """Seconds per optimizer step of the pope-lm LightningModule under a Lightning Trainer with `strategy` (default:
    the recipe's, as `pope-lm train` builds it); with profile_steps, then prints where that many more steps spent
    their GPU time."""
    module = LitGPT(cfg)
    if device.type == "cuda":
        module.model = torch.compile(module.model, mode=cfg.trainer.compile_mode)  # type: ignore[assignment]
    profile_steps = profile_steps if device.type == "cuda" else 0
    timer = _StepTimer(warmup, steps, profile_steps)
    callbacks: list[L.Callback] = [timer]
    if device.type == "cuda" and warmup >= 4:
        callbacks.append(_SyncProbe(warmup - 3, warmup - 1))
    accelerator, precision = ("gpu", "bf16-mixed") if device.type == "cuda" else ("cpu", "32-true")
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision,
        strategy=strategy or build_strategy(resolve_strategy(_one_device(cfg), None), accelerator, precision),
        max_steps=warmup + steps + profile_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(_Repeat(batches, warmup + steps + profile_steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds_per_step


def _one_device(cfg: RunConfig) -> RunConfig:
    return replace(cfg, trainer=replace(cfg.trainer, devices=1, num_nodes=1))


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batches: list[torch.Tensor], n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self):  # type: ignore[override]
        return (self.batches[i % len(self.batches)] for i in range(self.n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_threads(device: torch.device) -> int:
    """The threads the card can hold at once (SMs x threads per SM): CUDA reserves local memory for each of them."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count * props.max_threads_per_multi_processor


def local_memory_gib(device: torch.device) -> float:
    """The local memory CUDA holds for the current context: its per-thread stack size (cuCtxGetLimit, which the driver
    raises to what each launched kernel needs) times the threads the card can hold at once."""
    import ctypes

    stack_bytes = ctypes.c_size_t()
    if ctypes.CDLL("libcuda.so.1").cuCtxGetLimit(ctypes.byref(stack_bytes), 0):  # 0: CU_LIMIT_STACK_SIZE
        return math.nan
    return stack_bytes.value * resident_threads(device) / 2**30


def outside_allocator_gib(device: torch.device) -> float:
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / 2**30


def measure(name: str, variant: str, cfg: RunConfig, micro_batch: int, run: Callable[[], float],
            flops_per_token: float, device: torch.device, peak: float | None) -> Result:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = run()
    tokens = micro_batch * cfg.data.seq_len / seconds
    peak_gib = outside_gib = local_gib = math.nan
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        outside_gib, local_gib = outside_allocator_gib(device), local_memory_gib(device)
    mfu = tokens * flops_per_token / peak if peak else math.nan
    result = Result(name, variant, micro_batch, seconds * 1e3, tokens, mfu, peak_gib, outside_gib, local_gib)
    print(f"{name:6} {variant:18} {result.ms_per_step:8.1f} ms {tokens:12,.0f} tok/s  MFU {mfu:6.1%}  "
          f"peak {peak_gib:5.1f} GiB  outside the allocator {outside_gib:5.1f} GiB (local memory {local_gib:4.1f})",
          flush=True)
    return result


VARIANTS = ("pope-triton", "pope-lightning", "pope-lightning-ddp", "rope", "pope-reference", "nanogpt")
LIGHTNING_STRATEGIES = {"pope-lightning": None, "pope-lightning-ddp": "ddp"}  # None: the recipe's


def bench_recipe(name: str, cfg: RunConfig, micro_batch: int, warmup: int, steps: int, device: torch.device,
                 peak: float | None, variants: tuple[str, ...] = VARIANTS, profile_steps: int = 0
                 ) -> list[Result]:
    seq_len = cfg.data.seq_len
    batches = random_batches(4, micro_batch, seq_len, cfg.model.vocab_size, device)
    # the kernel by name on the GPU (`auto` runs the reference at short contexts); the CPU smoke run has no kernel
    kernel = "triton" if device.type == "cuda" else "auto"

    def pope_lm_model(**changes: str) -> GPT:
        return GPT(replace(cfg.model, **changes)).to(device)

    builds: dict[str, Callable[[], nn.Module]] = {
        "pope-triton": lambda: pope_lm_model(attention_backend=kernel),
        "rope": lambda: pope_lm_model(position="rope"),
        "pope-reference": lambda: pope_lm_model(attention_backend="reference"),
        "nanogpt": lambda: NanoGPT(cfg.model, seq_len).to(device),
    }
    lit_cfg = replace(cfg, model=replace(cfg.model, attention_backend=kernel))
    results = []
    for variant in variants:
        if variant in LIGHTNING_STRATEGIES:
            flops = GPT(cfg.model).flops_per_token(seq_len)
            strategy = LIGHTNING_STRATEGIES[variant]
            results.append(measure(name, variant, cfg, micro_batch,
                                   lambda s=strategy: time_lightning(lit_cfg, batches, warmup, steps, device,
                                                                     profile_steps, s),
                                   flops, device, peak))
            continue
        model = builds[variant]()
        flops = model.flops_per_token(seq_len)  # type: ignore[operator]
        results.append(measure(name, variant, cfg, micro_batch,
                               lambda m=model: time_bare_loop(m, batches, warmup, steps, device, profile_steps,
                                                              cfg.trainer.compile_mode),
                               flops, device, peak))
        del model
    return results


def parse_micro_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"--micro-batch: expected a number or auto, got {text!r}") from None


def load_recipe(spec: str) -> RunConfig:
    """`NAME` or `NAME:key=value,key=value`: recipes/NAME.yaml with those overrides."""
    name, _, overrides = spec.partition(":")
    try:
        return load_config(f"recipes/{name}.yaml", [item for item in overrides.split(",") if item])
    except ConfigError as exc:
        raise SystemExit(f"--recipes {spec}: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["124m", "774m"],
                        help="recipes/NAME.yaml, each optionally with overrides: NAME:key=value,key=value")
    parser.add_argument("--micro-batch", nargs="+", default=None,
                        help="one per recipe, a number or auto (the size trainer.micro_batch_size=auto picks for "
                             "the PoPE run, then used by every variant; default: the recipe's)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, on CPU")
    parser.add_argument("--seq-len", type=int, nargs="+", default=None,
                        help="context lengths to run each recipe at instead of its own, with as many tokens per "
                             "step (micro-batch x recipe length / length); rows are named recipe@length")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="which of the cases to time, in this order")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing each variant, profile this many more steps and print their GPU time by "
                             "part and by kernel")
    parser.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile's mode for every variant, the nanoGPT peer's too (reduce-overhead: each "
                             "step's forward and backward replayed as CUDA graphs; max-autotune: the same, and the "
                             "matmuls chosen among cuBLAS and Triton templates, which can fuse their neighbours)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    peak = peak_flops(args.peak_tflops)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # creates the context: the rows' memory outside the allocator starts from this
        print(f"before any variant: outside the allocator {outside_allocator_gib(device):.2f} GiB "
              f"(local memory {local_memory_gib(device):.2f})", flush=True)
    results: list[Result] = []
    for i, recipe in enumerate(args.recipes):
        cfg = load_recipe(recipe)
        cfg = replace(cfg, trainer=replace(cfg.trainer, compile_mode=args.compile_mode))
        if args.micro_batch:
            cfg = replace(cfg, trainer=replace(cfg.trainer, micro_batch_size=parse_micro_batch(args.micro_batch[i])))
        cfg = resolve_micro_batch_size(cfg, "gpu" if device.type == "cuda" else "cpu", "bf16-mixed")
        micro_batch = int(cfg.trainer.micro_batch_size)
        if args.smoke:
            cfg = replace(cfg, model=replace(cfg.model, n_layer=2, d_model=64, n_head=2, head_dim=32, vocab_size=512),
                          data=replace(cfg.data, seq_len=64))
            micro_batch, args.warmup, args.steps = 2, 1, 2
        for seq_len in args.seq_len or [cfg.data.seq_len]:
            at_len = replace(cfg, data=replace(cfg.data, seq_len=seq_len))
            name = f"{recipe}@{seq_len}" if args.seq_len else recipe
            results += bench_recipe(name, at_len, max(1, micro_batch * cfg.data.seq_len // seq_len), args.warmup,
                                    args.steps, device, peak, tuple(args.variants), args.profile)

    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "compile_mode": args.compile_mode,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"\n{env}\n")
    print("| recipe | variant | micro-batch | ms/step | tokens/s | MFU | peak GiB | outside the allocator GiB | "
          "of it local memory GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.recipe} | {r.variant} | {r.micro_batch} | {r.ms_per_step:.1f} | {r.tokens_per_s:,.0f} | "
              f"{r.mfu:.1%} | {r.peak_gib:.1f} | {r.outside_allocator_gib:.1f} | {r.local_memory_gib:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "results": [r.__dict__ for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
