"""PoPE flash attention on the GPU: correctness against float64 and timings against the peers.

For each (B, H, N, D) of issue 3 (bf16, causal):
1. checks our bf16 and fp16 outputs and the gradients of q, k, v, delta against the float64 reference
   (on as many heads as fit the reference's N x N matrices; every batch, so d delta is comparable);
2. times forward and forward+backward (CUDA events, median) and the peak extra memory of one
   forward+backward for
     ours       pope_attention (rotation in registers; on an H100 at D = 32 and 64 the Gluon kernels of
                kernels/flash_hopper.py, elsewhere Triton's; POPE_LM_GLUON=0 runs Triton's everywhere)
     ours fused-dq   the same with Triton's dk/dv pass adding dq by atomics at every shape (the A/B case that
                re-checks whether the fused pass wins anywhere; --no-ab leaves it out)
     a          RoPE (compiled elementwise) + SDPA, cuDNN backend
     b          PoPE materialized: q', k' 2D wide (compiled elementwise) + SDPA, cuDNN backend
     c          pope-pytorch 0.2.1 fused Triton kernel (PoPE_pytorch.triton_pope_flash_attn.flash_attn)
     d          RoPE (compiled elementwise) + SDPA, FLASH backend
     ours NAME  another revision's kernels/flash.py, given as --revision NAME=PATH (for instance
                `git show HEAD~1:kernels/flash.py > old.py`): a kernel change measured against its predecessor
   all in this one process; the forward and forward+backward also replayed from a CUDA graph (every case but c),
   which takes the host's launch overhead out: at N <= 4096 the eager timings measure mostly that overhead.
First, check only (no timings) at each of CHECK_SHAPES: ours and b in bf16 against float64, with random inputs and
with sharp ones (q, k scaled by SHARP: logits in the hundreds, one key dominating each query).
Prints the markdown table last and writes it, a log and a JSON under --out.

Run on the device machine from the repository root: python3 benchmarks/attention.py --out "$OUT"
(benchmarks/attention_session.sh does it in one device call, wheels installed first).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(8, 12, 1024, 64), (2, 12, 4096, 64), (1, 12, 10240, 64), (1, 16, 16384, 64), (4, 16, 2048, 128)]
# Check only: the short-context experiment's attention (bf16, causal), where training with our kernel grew the largest
# logit from ~100 to ~1800 and collapsed while the plain-torch backend's stayed near 100. At N = 64 the autotuned key
# block (128) is longer than the sequence and the backward takes the fused dq pass.
CHECK_SHAPES = [(256, 8, 64, 64)]
SHARP = 16.0  # q and k scaled by this (exactly, a power of two) for the sharp check
THETA = 10000.0
LOG: list[str] = []
START = time.monotonic()


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    if line and not line.startswith(("|", " ")):
        line = f"[{time.monotonic() - START:5.0f}s] {line}"
    LOG.append(line)
    print(line, flush=True)


def import_kernels():
    """pope_lm.kernels, installed or not (the install maps the top-level kernels/ folder to that name)."""
    try:
        import pope_lm.kernels as kernels
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT))
        import pope_lm  # noqa: F401  (the parent package must exist before its submodule)

        spec = importlib.util.spec_from_file_location("pope_lm.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["pope_lm.kernels"] = kernels
        spec.loader.exec_module(kernels)
    return kernels


kernels = import_kernels()
flash = kernels.flash
pope_attention, pope_attention_reference = kernels.pope_attention, kernels.pope_attention_reference


# ---------------------------------------------------------------------------------------------------------
# The peers


@torch.compile(dynamic=True)
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@torch.compile(dynamic=True)
def pope_materialize(q: torch.Tensor, k: torch.Tensor, delta: torch.Tensor,
                     phase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q' = [mu_q cos(t theta), mu_q sin(t theta)], k' likewise with + delta: (B, H, N, 2D)."""
    mu_q, mu_k = F.softplus(q.float()), F.softplus(k.float())
    phase_k = phase + delta[:, None, :]
    q2 = torch.cat((mu_q * phase.cos(), mu_q * phase.sin()), dim=-1)
    k2 = torch.cat((mu_k * phase_k.cos(), mu_k * phase_k.sin()), dim=-1)
    return q2.to(q.dtype), k2.to(k.dtype)


def load_revision(name: str, path: Path) -> types.ModuleType:
    """Another revision's kernels/flash.py as the module pope_lm.kernels.revision_NAME, its custom ops registered
    under the namespace pope_lm_NAME (torch.library allows one definition of an op name per process)."""
    if not name.isidentifier():
        raise SystemExit(f"--revision: NAME must be a Python identifier; got {name!r}")
    source = path.read_text().replace('"pope_lm::', f'"pope_lm_{name}::')
    module = types.ModuleType(f"pope_lm.kernels.revision_{name}")
    module.__package__, module.__file__ = "pope_lm.kernels", str(path)
    sys.modules[module.__name__] = module
    exec(compile(source, str(path), "exec"), module.__dict__)  # the file's own path: Triton reads its source
    return module


REVISIONS: dict[str, types.ModuleType] = {}  # --revision NAME=PATH, loaded in main


def pope_pytorch_flash_attn():
    from PoPE_pytorch.triton_pope_flash_attn import flash_attn
    return flash_attn


@dataclass
class Case:
    name: str
    forward: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]  # what forward+backward differentiates
    dout: torch.Tensor
    # (out, d q, d k, d v, d delta) in (B, H, N, D) layout, for the float64 comparison; None for RoPE
    pope_outputs: Callable[[], tuple[torch.Tensor, ...]] | None = None
    sdpa_backend: SDPBackend | None = None  # entered once around the calls, not inside each
    fused_dq: bool = False  # ours with dq by atomics in the dk/dv pass (A/B)
    results: dict = field(default_factory=dict)

    def backend(self):
        stack = ExitStack()
        if self.sdpa_backend is not None:
            stack.enter_context(sdpa_kernel(self.sdpa_backend))
        if self.fused_dq:
            stack.enter_context(fused_dq_pass())
        return stack


@contextmanager
def fused_dq_pass():
    """The A/B switch: every shape's backward adds dq inside the dk/dv pass while inside."""
    saved = flash.FUSED_DQ_HEAD_DIMS, flash.FUSED_DQ_MAX_KEYS
    flash.FUSED_DQ_HEAD_DIMS, flash.FUSED_DQ_MAX_KEYS = frozenset(flash.HEAD_DIMS), sys.maxsize
    try:
        yield
    finally:
        flash.FUSED_DQ_HEAD_DIMS, flash.FUSED_DQ_MAX_KEYS = saved


def make_cases(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int,
               ab: bool = True, peer_c: bool = True, scale_qk: float = 1.0) -> tuple[list[Case], dict]:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v, dout = (torch.randn(b, h, n, d, device=dev, generator=g).to(dtype) for _ in range(4))
    q, k = scale_qk * q, scale_qk * k
    delta = -2 * math.pi * torch.rand(h, d, device=dev, generator=g)
    pos = torch.arange(n, device=dev, dtype=torch.float32)
    phase = pos[:, None] * kernels.pope_frequencies(d, THETA, dev)  # (N, D), t theta
    inv_freq = THETA ** (-torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
    rope_cos, rope_sin = (pos[:, None] * inv_freq).cos(), (pos[:, None] * inv_freq).sin()
    scale = 1 / math.sqrt(d)
    leaves = {name: x.clone().requires_grad_() for name, x in
              dict(q=q, k=k, v=v, delta=delta).items()}

    def grads_of(case: Case) -> tuple[torch.Tensor, ...]:
        out = case.forward()
        return (out.detach(), *torch.autograd.grad(out, case.inputs, case.dout))

    def rope_sdpa():
        qr = apply_rope(leaves["q"], rope_cos, rope_sin)
        kr = apply_rope(leaves["k"], rope_cos, rope_sin)
        return F.scaled_dot_product_attention(qr, kr, leaves["v"], is_causal=True, scale=scale)

    def pope_sdpa():
        q2, k2 = pope_materialize(leaves["q"], leaves["k"], leaves["delta"], phase)
        return F.scaled_dot_product_attention(q2, k2, leaves["v"], is_causal=True, scale=scale)

    def ours(attention=pope_attention):
        return attention(leaves["q"], leaves["k"], leaves["v"], leaves["delta"], causal=True)

    pope_inputs = [leaves[x] for x in ("q", "k", "v", "delta")]
    cases = [
        Case("ours", ours, pope_inputs, dout),
        *(Case(f"ours {name}", (lambda m: lambda: ours(m.pope_attention))(module), pope_inputs, dout)
          for name, module in REVISIONS.items()),
        *([Case("ours fused-dq (A/B)", ours, pope_inputs, dout, fused_dq=True)] if ab else []),
        Case("a rope+cuDNN", rope_sdpa, pope_inputs[:3], dout, sdpa_backend=SDPBackend.CUDNN_ATTENTION),
        Case("b pope materialized+cuDNN", pope_sdpa, pope_inputs, dout, sdpa_backend=SDPBackend.CUDNN_ATTENTION),
        Case("d rope+FLASH", rope_sdpa, pope_inputs[:3], dout, sdpa_backend=SDPBackend.FLASH_ATTENTION),
    ]
    for case in cases:
        if case.name.startswith(("ours", "b ")):
            case.pope_outputs = (lambda c: lambda: grads_of(c))(case)

    # pope-pytorch takes (B, N, H, D) and positions' phases (N, D); its bias is our delta
    try:
        if not peer_c:
            raise RuntimeError("left out at this shape (--peer-c-shapes)")
        flash_attn = pope_pytorch_flash_attn()
        bnhd = {name: leaves[name].detach().transpose(1, 2).contiguous().requires_grad_() for name in "qkv"}
        bias = leaves["delta"].detach().clone().requires_grad_()
        dout_bnhd = dout.transpose(1, 2).contiguous()

        def pope_pytorch():
            return flash_attn(bnhd["q"], bnhd["k"], bnhd["v"], freqs=phase, pope_bias=bias, causal=True)

        c = Case("c pope-pytorch fused", pope_pytorch, [bnhd["q"], bnhd["k"], bnhd["v"], bias], dout_bnhd)

        def c_outputs():
            out, dq, dk, dv, dbias = grads_of(c)
            return (*(x.transpose(1, 2) for x in (out, dq, dk, dv)), dbias)

        c.pope_outputs = c_outputs
        cases.insert(len(cases) - 1, c)
    except Exception as e:  # report and go on without it
        log("pope-pytorch unavailable:", repr(e))
    data = dict(q=q, k=k, v=v, delta=delta, dout=dout)
    return cases, data


# ---------------------------------------------------------------------------------------------------------
# Checks and timings


def reference_outputs(data: dict, heads: slice) -> tuple[torch.Tensor, ...]:
    """Float64 out and gradients on a subset of heads (heads are independent; d delta sums over batch)."""
    q, k, v = (data[x][:, heads].double().requires_grad_() for x in "qkv")
    delta = data["delta"][heads].double().requires_grad_()
    out = pope_attention_reference(q, k, v, delta, causal=True, theta=THETA)
    grads = torch.autograd.grad(out, (q, k, v, delta), data["dout"][:, heads].double())
    return (out.detach(), *grads)


def check(cases: list[Case], data: dict, heads: slice, label: str, errors_by_case: dict) -> None:
    """Each PoPE case's output and gradients against the float64 reference, into errors_by_case["<case> <label>"]
    and the log."""
    ref = reference_outputs(data, heads)
    for case in cases:
        if case.pope_outputs is None:
            continue
        try:
            with case.backend():
                errs = rel_errors(case.pope_outputs(), ref, heads)
        except Exception as e:
            errs = {"error": repr(e)[:200]}
        name = f"{case.name} {label}"
        errors_by_case[name] = errs
        log(f"check {name} on heads {heads.start}:{heads.stop}: "
            + " ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in errs.items()))


def rel_errors(outputs: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], heads: slice) -> dict:
    names = ("out", "dq", "dk", "dv", "ddelta")
    errors = {}
    for name, x, r in zip(names, outputs, ref, strict=True):
        x = x[heads] if name == "ddelta" else x[:, heads]
        if not torch.isfinite(x).all():
            errors[name] = float("nan")
        else:
            errors[name] = ((x.double() - r).norm() / r.norm()).item()
    return errors


def reference_heads(b: int, h: int, n: int) -> slice:
    per_head = b * n * n * 8  # bytes of one float64 N x N score matrix per head, over the batch
    return slice(0, max(1, min(h, int(1.5e9 // per_head))))


def bench(fn: Callable[[], object], slow: bool = False) -> float:
    """Median ms of fn; a slow fn (pope-pytorch: up to ~0.3 s a call) gets 3 event-timed calls after one."""
    if not slow:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[1]


def bench_graphed(fn: Callable[[], object]) -> float | None:
    """Median ms of fn replayed from a CUDA graph: the GPU's own time, without the host's launch overhead that bounds
    every case at N = 1024 in eager timing (and that a compiled training step hides by running ahead). None where
    capture fails (a host synchronization in fn); the error goes to the log."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:
        log(f"    CUDA-graph timing failed: {e!r}"[:300])
        return None


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory fn allocates above what was allocated before it ran."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_case(case: Case) -> None:
    slow = case.name.startswith("c ")

    def fwd_bwd():
        return torch.autograd.grad(case.forward(), case.inputs, case.dout)

    with case.backend():
        fwd_bwd()  # compile / autotune outside the timings
        case.results["fwd_ms"] = bench(case.forward, slow)
        case.results["fwd_bwd_ms"] = bench(fwd_bwd, slow)
        if not slow:  # peer c synchronizes with the host inside its backward; its eager time is its own anyway
            case.results["fwd_graph_ms"] = bench_graphed(case.forward)
            case.results["fwd_bwd_graph_ms"] = bench_graphed(fwd_bwd)
        case.results["peak_extra_mib"] = peak_extra_bytes(fwd_bwd) / 2**20


def kernel_profile(case: Case) -> None:
    """Per-kernel GPU time of one forward+backward (mean of 5), into the log."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(case.forward(), case.inputs, case.dout)
            torch.cuda.synchronize()
        rows = []
        for evt in prof.key_averages():
            t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            if t > 0:
                rows.append((t / 5 / 1000, evt.key[:90]))
        for t, key in sorted(rows, reverse=True)[:8]:
            log(f"    {t:8.3f} ms  {key}")
    except Exception as e:
        log("    profile failed:", repr(e))


def kernel_resources() -> None:
    """Registers, spills and shared memory of every compiled variant of our kernels (compiler report)."""
    for fn in (flash._fwd_kernel, flash._dq_kernel, flash._dkdv_kernel, flash._softplus_kernel, flash._dvec_kernel,
               flash._dq_finish_kernel):
        try:
            for entry in fn.device_caches.values():
                for compiled in entry[0].values():
                    compiled._init_handles()
                    consts = {k: v for k, v in compiled.src.constants.items() if isinstance(v, (int, bool, str))}
                    log(f"  {fn.__name__}: regs {compiled.n_regs} spills {compiled.n_spills} "
                        f"smem {compiled.metadata.shared} warps {compiled.metadata.num_warps} "
                        f"stages {compiled.metadata.num_stages} {consts}")
        except Exception as e:
            log(f"  {fn.__name__}: no compiler report ({e!r})")


def tuned_configs() -> str:
    parts = []
    for name, tuned in (("fwd", flash._fwd_tuned), ("dq", flash._dq_tuned), ("dkdv", flash._dkdv_tuned)):
        timings = getattr(tuned, "configs_timings", None) or {}
        ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], list) else kv[1])
        shown = ", ".join(f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}/w{c.num_warps}/s{c.num_stages}="
                          f"{(t[0] if isinstance(t, list) else t):.3f}" for c, t in ranked)
        parts.append(f"{name}: {shown}")
    return "\n    ".join(parts)


def ceilings() -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    log(f"bf16 8192^3 matmul: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
    x = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    ms = bench(lambda: x.clone())
    log(f"device copy: {2 * 2**30 / ms / 1e9:.2f} TB/s (read + write)")


def flops(b: int, h: int, n: int, d: int, pope: bool) -> tuple[float, float]:
    """Useful causal FLOPs (fwd, fwd+bwd): PoPE 22 N^2 d per head (pope.md), RoPE 14; causal halves them."""
    fwd, total = (6, 22) if pope else (4, 14)
    return fwd * n * n * d * b * h / 2, total * n * n * d * b * h / 2


def run_shape(shape: tuple[int, int, int, int], rows: list[dict], check_fp16: bool, ab: bool,
              peer_c: bool) -> None:
    b, h, n, d = shape
    log(f"\n=== B={b} H={h} N={n} D={d} ===")
    heads = reference_heads(b, h, n)
    errors_by_case: dict[str, dict] = {}
    for dtype in (torch.float16, torch.bfloat16) if check_fp16 else (torch.bfloat16,):
        cases, data = make_cases(b, h, n, d, dtype, seed=n + d, ab=ab, peer_c=peer_c)
        checked = cases if dtype == torch.bfloat16 else cases[:1]
        check(checked, data, heads, str(dtype).removeprefix("torch."), errors_by_case)
        if dtype == torch.float16:
            del cases, data
            torch.cuda.empty_cache()
    log("  autotuned (ms):\n    " + tuned_configs())

    for case in cases:
        try:
            time_case(case)
        except Exception as e:
            case.results["error"] = repr(e)[:300]
            log(f"{case.name} failed:", traceback.format_exc()[-1500:])
        r = case.results
        if "fwd_ms" in r:
            fl_fwd, fl_tot = flops(b, h, n, d, pope="rope" not in case.name)
            log(f"{case.name:28s} fwd {r['fwd_ms']:8.3f} ms ({fl_fwd / r['fwd_ms'] / 1e9:5.0f} TFLOP/s)  "
                f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms ({fl_tot / r['fwd_bwd_ms'] / 1e9:5.0f} TFLOP/s)  "
                f"peak extra {r['peak_extra_mib']:8.1f} MiB")
    ours = next(c for c in cases if c.name == "ours")
    log("  kernel times of ours (one fwd+bwd):")
    kernel_profile(ours)
    base = next((c for c in cases if c.name.startswith("a ")), None)
    for case in cases:
        errs = errors_by_case.get(f"{case.name} bfloat16", {})
        err = max((v for v in errs.values() if isinstance(v, float)), default=None)
        fp16 = errors_by_case.get(f"{case.name} float16", {})
        err16 = max((v for v in fp16.values() if isinstance(v, float)), default=None)
        rows.append(dict(shape=shape, case=case.name, **case.results, max_err_bf16=err, max_err_fp16=err16,
                         ratio=relative(case.results, base.results if base else {}, "fwd_bwd_ms"),
                         graph_ratio=relative(case.results, base.results if base else {}, "fwd_bwd_graph_ms")))
    del cases, data
    torch.cuda.empty_cache()


def check_shape(shape: tuple[int, int, int, int], rows: list[dict]) -> None:
    """Correctness only, bf16, causal: ours (its default dq path) and b (plain torch on the same bf16 inputs) against
    float64, with random inputs and with sharp ones. Ours should stay within ~2x of b's errors."""
    b, h, n, d = shape
    log(f"\n=== check only: B={b} H={h} N={n} D={d} (dq pass: {'fused' if flash.uses_fused_dq(d, n) else 'split'}) ===")
    heads = reference_heads(b, h, n)
    for label, scale in (("bfloat16", 1.0), (f"bfloat16 sharp (q, k x {SHARP:g})", SHARP)):
        cases, data = make_cases(b, h, n, d, torch.bfloat16, seed=n + d, ab=False, peer_c=False, scale_qk=scale)
        logits = kernels.reference.pope_scores(data["q"][:, :1].double(), data["k"][:, :1].double(),
                                               data["delta"][:1].double(), theta=THETA).tril()
        log(f"{label}: largest logit on head 0 {logits.max().item():.0f}")
        errors: dict[str, dict] = {}
        check([c for c in cases if c.name.startswith(("ours", "b "))], data, heads, label, errors)
        for name, errs in errors.items():
            rows.append(dict(shape=shape, case=name, max_err_bf16=max(
                (v for v in errs.values() if isinstance(v, float)), default=None)))
        ours, peer = errors[f"ours {label}"], errors.get(f"b pope materialized+cuDNN {label}", {})
        worst = max((ours[k] / peer[k] for k in ours if isinstance(peer.get(k), float) and peer[k] > 0), default=None)
        log(f"  ours / b, worst of out and the gradients: {fmt(worst, '.2f')} (~1 expected; >> 1: ours is off)")
        del cases, data, logits
        torch.cuda.empty_cache()


def quotient(x: float | None, y: float | None) -> float | None:
    """x / y, None where either is missing."""
    return x / y if x is not None and y else None


def relative(results: dict, base: dict, key: str) -> float | None:
    """results[key] / base[key], None where either is missing."""
    return quotient(results.get(key), base.get(key))


def fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = ["| B, H, N, D | case | fwd ms | fwd ms, CUDA graph | fwd+bwd ms | fwd+bwd / a | fwd+bwd ms, CUDA graph "
             "| graph / a | peak extra MiB | max rel err bf16 (fp16) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = fmt(r.get("max_err_bf16"), ".1e") + (f" ({fmt(r['max_err_fp16'], '.1e')})"
                                                     if r.get("max_err_fp16") is not None else "")
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['case']} | failed: {r['error'][:60]} | | | | | | | |")
            continue
        lines.append(f"| {', '.join(map(str, r['shape']))} | {r['case']} | {fmt(r.get('fwd_ms'), '.3f')} | "
                     f"{fmt(r.get('fwd_graph_ms'), '.3f')} | {fmt(r.get('fwd_bwd_ms'), '.3f')} | "
                     f"{fmt(r.get('ratio'), '.2f')} | "
                     f"{fmt(r.get('fwd_bwd_graph_ms'), '.3f')} | {fmt(r.get('graph_ratio'), '.2f')} | "
                     f"{fmt(r.get('peak_extra_mib'), '.0f')} | {err} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """Issue 3's targets, shape by shape (D = 64 shapes are the ones the targets name)."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows if "fwd_ms" in r):
        by = {r["case"].split()[0]: r for r in rows if r["shape"] == shape and "(A/B)" not in r["case"]
              and r["case"].removeprefix("ours ") not in REVISIONS}
        o, a, b, c = (by.get(x, {}) for x in ("ours", "a", "b", "c"))

        def nan_if_none(value: float | None) -> float:
            return math.nan if value is None else value

        def ratio(x, y, key):
            return nan_if_none(relative(x, y, key))
        c_over_graph = nan_if_none(quotient(c.get("fwd_bwd_ms"), o.get("fwd_bwd_graph_ms")))
        lines.append(
            f"{shape}: fwd/a {ratio(o, a, 'fwd_ms'):.2f} (<= 1.2; CUDA graph {ratio(o, a, 'fwd_graph_ms'):.2f}), "
            f"fwd+bwd/a {ratio(o, a, 'fwd_bwd_ms'):.2f} "
            f"(<= 1.3; CUDA graph {ratio(o, a, 'fwd_bwd_graph_ms'):.2f}), fwd+bwd/b {ratio(o, b, 'fwd_bwd_ms'):.2f} "
            f"(<= 1; CUDA graph {ratio(o, b, 'fwd_bwd_graph_ms'):.2f}), c/ours {ratio(c, o, 'fwd_bwd_ms'):.1f} (>= 10; "
            f"against our CUDA-graph time {c_over_graph:.1f}), "
            f"peak/a {ratio(o, a, 'peak_extra_mib'):.2f} (<= 1)")
    return "\n".join(lines)


def environment() -> str:
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.split("\n")[0].strip()  # one line per GPU
    except OSError:
        driver = "?"
    try:
        from importlib.metadata import version
        pope_pytorch = version("pope-pytorch")
    except Exception:
        pope_pytorch = "not installed"
    return (f"{torch.cuda.get_device_name()}, driver {driver}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, triton {triton.__version__}, "
            f"pope-pytorch {pope_pytorch}, {datetime.date.today()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for the table, log and JSON")
    parser.add_argument("--shapes", type=int, nargs="*", default=[0, 1, 2, 4, 3],
                        help="indices into SHAPES, in the order to run (the slowest last)")
    parser.add_argument("--fp16-shapes", type=int, nargs="*", default=[0, 1, 2, 3, 4],
                        help="shapes whose fp16 output and gradients are checked too (each dtype autotunes anew)")
    parser.add_argument("--peer-c-shapes", type=int, nargs="*", default=[0, 1, 2, 3],
                        help="shapes that run peer c (pope-pytorch: its D = 128 autotuning alone takes ~60 s)")
    parser.add_argument("--check-shapes", type=int, nargs="*", default=[0],
                        help="indices into CHECK_SHAPES, checked (bf16, random and sharp inputs, no timings) first")
    parser.add_argument("--no-ab", dest="ab", action="store_false",
                        help="leave out the A/B case 'ours split-dq' (v1's separate dq pass)")
    parser.add_argument("--revision", action="append", default=[], metavar="NAME=PATH",
                        help="another revision's kernels/flash.py, timed and checked as the case 'ours NAME'")
    args = parser.parse_args()
    for spec in args.revision:
        name, _, path = spec.partition("=")
        REVISIONS[name] = load_revision(name, Path(path))
    log(environment())
    ceilings()
    rows: list[dict] = []
    for i in args.check_shapes:
        try:
            check_shape(CHECK_SHAPES[i], rows)
        except Exception:
            log(f"check shape {CHECK_SHAPES[i]} failed:", traceback.format_exc()[-3000:])
    for i in args.shapes:
        try:
            run_shape(SHAPES[i], rows, check_fp16=i in args.fp16_shapes, ab=args.ab,
                      peer_c=i in args.peer_c_shapes)
        except Exception:
            log(f"shape {SHAPES[i]} failed:", traceback.format_exc()[-3000:])
        report(rows, args.out)  # after every shape: a run cut short still leaves its numbers
    log("\nour kernels, compiler report:")
    kernel_resources()
    report(rows, args.out)


def report(rows: list[dict], out: Path | None) -> None:
    result = f"{environment()}\nbf16, causal; medians of CUDA-event timings (triton do_bench)\n\n{table(rows)}"
    log("\ntargets:\n" + targets(rows))
    log("\n" + result)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention_results.md").write_text(result + "\n")
        (out / "attention_log.txt").write_text("\n".join(LOG) + "\n")
        (out / "attention_rows.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
