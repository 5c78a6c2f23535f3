"""The Gluon forward and dq pass alone, CUDA-graph us, per revision, interleaved over 3 rounds (median of rounds),
and whether each revision's outputs equal the first's bit for bit; a revision named nobar*.py gets ab/ptxpatch's
barrier-free PTX. With --fwd-only, the forward only (what calls 1, 6 and 7 ran, as fwdtime.py).
usage: python ab/passtime.py SHAPES(B,H,N[,D];...) REV.py ... [--fwd-only]"""
import math
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "ab")
from hopper_check import load_revision
from ptxpatch import patched_revision

from pope_lm import kernels
from pope_lm.kernels import flash

shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[1].split(";")]
fwd_only = "--fwd-only" in sys.argv
variants = {Path(p).stem: (patched_revision if Path(p).stem.startswith("nobar") else load_revision)(Path(p))
            for p in sys.argv[2:] if p != "--fwd-only"}


def time_shape(shape: tuple[int, ...]) -> None:
    b, h, n, d = shape if len(shape) == 4 else (*shape, 64)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, n, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4))
    delta = -2 * math.pi * torch.rand(h, d, device="cuda", generator=g)
    freqs = kernels.reference.pope_frequencies(d, 10000.0, "cuda")
    sm_scale = 1 / math.sqrt(d)
    qk_scale = math.log2(math.e) * sm_scale
    mu_k, mu_q = flash._magnitudes(k), flash._magnitudes(q)
    lse, dvec = torch.empty(b, h, n, device="cuda"), torch.empty(b, h, n, device="cuda")
    out = torch.empty_like(q)
    first = next(iter(variants.values()))
    first.forward(q, mu_k, v, freqs, delta, out, lse, True, qk_scale, 0)
    first.dq_pass(q, mu_q, mu_k, v, freqs, delta, out, dout, lse, dvec, torch.empty_like(q), True, sm_scale, 0)
    results = {}
    cases = {}
    for name, m in variants.items():
        o, lse_o, dq, dv = torch.empty_like(q), torch.empty_like(lse), torch.empty_like(q), torch.empty_like(dvec)
        dk, dvv, ddelta = torch.empty_like(k), torch.empty_like(v), torch.zeros(h, d, device="cuda")
        m.forward(q, mu_k, v, freqs, delta, o, lse_o, True, qk_scale, 0)
        if not fwd_only:
            m.dq_pass(q, mu_q, mu_k, v, freqs, delta, out, dout, lse, dv, dq, True, sm_scale, 0)
            m.dkdv_pass(mu_q, mu_k, k, v, freqs, delta, dout, lse, dvec, dk, dvv, ddelta, True, qk_scale, 0)
        torch.cuda.synchronize()
        results[name] = (o, lse_o, dq, dv, dk, dvv, ddelta)
        cases[name] = {
            "fwd": lambda m=m, o=o, lse_o=lse_o: m.forward(q, mu_k, v, freqs, delta, o, lse_o, True, qk_scale, 0),
            "dq": lambda m=m, dq=dq, dv=dv: m.dq_pass(q, mu_q, mu_k, v, freqs, delta, out, dout, lse, dv, dq, True,
                                                       sm_scale, 0),
            "dkdv": lambda m=m, dk=dk, dvv=dvv, ddelta=ddelta: m.dkdv_pass(
                mu_q, mu_k, k, v, freqs, delta, dout, lse, dvec, dk, dvv, ddelta, True, qk_scale, 0)}
    ref = next(iter(results.values()))
    same = {name: all(torch.equal(a, r) for a, r in zip(res, ref, strict=True)) for name, res in results.items()}
    for what in ("fwd",) if fwd_only else ("fwd", "dq", "dkdv"):
        times = {name: [] for name in variants}
        for _ in range(3):
            for name in variants:
                times[name].append(1e3 * triton.testing.do_bench_cudagraph(cases[name][what]))
        base = sorted(next(iter(times.values())))[1]
        print(f"({b},{h},{n},{d}) {what} us: " + "  ".join(
            f"{name}={sorted(t)[1]:.1f} ({100 * (sorted(t)[1] / base - 1):+.1f}%){'' if same[name] else ' DIFFERS'}"
            for name, t in times.items()), flush=True)


for shape in shapes:
    time_shape(shape)
