"""What each program of the Hopper (Gluon) attention passes costs beyond its tiles, on the GPU.

A pass's time is modelled as (tiles x c_tile + programs x c_fixed) / SMs: c_tile is the steady cost of one streamed
tile's work (64 keys in the forward and dq pass, 32 queries in the dk/dv pass, for a program's 128 stationary rows:
units of work, which the kernels' tiles may hold several of, e.g. the dk/dv pass's 64-query tiles since session 21) and
c_fixed what a program pays once (launch, its rows' halves and loads, the epilogue). Timing each pass at shapes of
equal total work (B H N^2 constant, causal, bf16, D = 64) from N = 1024 (many short programs, the pretraining shape)
to N = 5792 (few long ones) and fitting both constants by least squares says how much of the N = 1024 time the
per-program part is, i.e. what a persistent kernel or a cheaper prologue and epilogue could win. The softplus
pre-passes and cuDNN's forward (no rotation) are timed alongside. CUDA-graph medians.

    python3 benchmarks/hopper_program_cost.py     # on the device machine, from the repository root
    python3 benchmarks/hopper_program_cost.py --revision old.py   # and another revision's flash_hopper.py beside it
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from attention import THETA, kernels  # this checkout's kernels, installed or not

flash = kernels.flash
HEAD_DIM = 64
# (B, H, N) with B H N^2 = 192 x 1024^2
SHAPES = [(16, 12, 1024), (16, 6, 1448), (8, 6, 2048), (2, 6, 4096), (1, 6, 5792)]


def pass_times(b: int, h: int, n: int, hopper=flash.flash_hopper, peers: bool = True,
               head_dim: int = HEAD_DIM) -> dict[str, float]:
    """Microseconds of each Gluon pass of `hopper` (a revision of kernels/flash_hopper.py) and, with `peers`, the
    pre-passes and cuDNN's forward at (b, h, n, head_dim)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, n, head_dim, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4))
    delta = -2 * math.pi * torch.rand(h, head_dim, device="cuda", generator=g)
    freqs = kernels.reference.pope_frequencies(head_dim, THETA, "cuda")
    sm_scale = 1 / math.sqrt(head_dim)
    qk_scale = sm_scale * math.log2(math.e)
    out, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
    lse, dvec = torch.empty(b, h, n, device="cuda"), torch.empty(b, h, n, device="cuda")
    ddelta = torch.zeros(h, head_dim, device="cuda")
    mu_k = flash._magnitudes(k)
    hopper.forward(q, mu_k, v, freqs, delta, out, lse, True, qk_scale, 0)
    mu_q = flash._magnitudes(q)
    hopper.dq_pass(q, mu_q, mu_k, v, freqs, delta, out, dout, lse, dvec, dq, True, sm_scale, 0)  # dvec for dk/dv
    cases = {
        "fwd": lambda: hopper.forward(q, mu_k, v, freqs, delta, out, lse, True, qk_scale, 0),
        "dq": lambda: hopper.dq_pass(q, mu_q, mu_k, v, freqs, delta, out, dout, lse, dvec, dq, True, sm_scale, 0),
        "dkdv": lambda: hopper.dkdv_pass(mu_q, mu_k, k, v, freqs, delta, dout, lse, dvec, dk, dv, ddelta, True,
                                         qk_scale, 0),
    }
    if peers:
        cases |= {"prepass_k": lambda: flash._magnitudes(k), "prepass_q": lambda: flash._magnitudes(q)}
    times = {name: 1e3 * triton.testing.do_bench_cudagraph(fn) for name, fn in cases.items()}
    if not peers:
        return times
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        times["cudnn_fwd"] = 1e3 * triton.testing.do_bench_cudagraph(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return times


def load_revision(path: Path):
    """Another revision's kernels/flash_hopper.py as a module of its own (its passes must take this checkout's
    arguments)."""
    # named inside pope_lm.kernels, so that its relative imports (work_order) resolve to this checkout's modules
    spec = importlib.util.spec_from_file_location(f"pope_lm.kernels.flash_hopper_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # Gluon reads the kernels' source from the file
    return module


def tiles(n: int) -> dict[str, int]:
    """Streamed tiles of all programs of one head (causal, 128 stationary rows), in the units of the module's docstring:
    64 keys (forward, dq pass) and 32 queries (dk/dv pass)."""
    blocks = triton.cdiv(n, 128)
    forward = sum(triton.cdiv(min(m * 128 + 128, n), 64) for m in range(blocks))  # keys up to the block's last row
    dkdv = sum(triton.cdiv(n - m * 128 // 32 * 32, 32) for m in range(blocks))  # queries from the block's first key
    return {"fwd": forward, "dq": forward, "dkdv": dkdv, "programs": blocks}


def fit(name: str, rows: list[tuple[dict[str, int], dict[str, float]]], sms: int) -> str:
    """Pass `name`'s per-tile and per-program costs, least squares over the shapes' (counts, times) rows."""
    design = np.array([[c[name] / sms, c["programs"] / sms] for c, _ in rows], dtype=float)
    measured = np.array([t[name] for _, t in rows])
    (c_tile, c_fixed), *_ = np.linalg.lstsq(design, measured, rcond=None)
    residuals = design @ np.array([c_tile, c_fixed]) - measured
    share = rows[0][0]["programs"] / sms * c_fixed / measured[0]
    return (f"{name}: per tile {c_tile:.3f} us, per program {c_fixed:.2f} us; fit residuals "
            + " ".join(f"{r:+.1f}" for r in residuals) + f"; per-program share at N = {SHAPES[0][2]}: {share:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revision", type=Path, nargs="*", default=[],
                        help="other revisions' kernels/flash_hopper.py, timed and fitted beside this checkout's")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    variants = {"this checkout": flash.flash_hopper} | {path.stem: load_revision(path) for path in args.revision}
    rows: dict[str, list] = {name: [] for name in variants}
    for b, h, n in SHAPES:  # the variants side by side at each shape
        counts = {name: b * h * c for name, c in tiles(n).items()}
        for i, (name, hopper) in enumerate(variants.items()):
            times = pass_times(b, h, n, hopper, peers=i == 0)
            rows[name].append((counts, times))
            print(f"{name}: BH={b * h:4} N={n:5} programs={counts['programs']:5} "
                  + " ".join(f"{p}={us:8.1f}us" for p, us in times.items()), flush=True)
    for name in variants:
        for kernel in ("fwd", "dq", "dkdv"):
            print(f"{name}: {fit(kernel, rows[name], sms)}")


if __name__ == "__main__":
    main()
