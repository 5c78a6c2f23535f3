"""The Hopper (Gluon) attention passes on the GPU: edge cases against float64, and their time against other revisions.

CI cannot run kernels/flash_hopper.py (Gluon has no CPU interpreter; tests/test_flash_hopper.py only compiles it), so
this script is its numerical test on an H100:
1. for each case of CASES (odd lengths, Nq < Nk with q_offset, one query, non-causal, fp16, the sharp q, k x 16 case,
   D = 32, 64 and 128) the relative errors of out, dq, dk, dv and d delta against the float64 reference, for the Triton
   kernels (POPE_LM_GLUON=0) and the Gluon ones side by side: a Gluon row must match the Triton row to the printed
   digit, since both build the same halves and differ only in summation order, and so must the "paired" and "listed"
   rows (the forward and the dq pass taking their work in those orders, which these cases are too small to choose:
   see flash_hopper._work). At D <= 64 dk, dv and d delta may differ in the last digit: both dk/dv passes advance the
   queries' phases by angle addition, in steps of 32 rows in Gluon and of the Triton tile in flash.py, so their
   rounded halves differ (session 32: nine such digits over the D = 64 cases, both ways). Then PACKED_CASES,
   whose q, k and v are views of one projection, as the model passes them (--long-only: only the cases with
   LONG_KEYS keys or more, --packed-only: only PACKED_CASES, --head-dim: one head dim's); first of all, the listed
   order under torch.compile's CUDA graphs (check_compiled_graphs);
2. forward and forward+backward time replayed from a CUDA graph at TIMED shapes (or --timed) for the Triton
   kernels, this checkout's Gluon kernels and, with --revision PATH [PATH ...] (other revisions' flash_hopper.py, e.g.
   `git show HEAD~1:kernels/flash_hopper.py > old.py`), those revisions' Gluon kernels, all in this one process; first
   each Gluon pass alone at the 124M pretraining shape (16, 12, 1024, 64) and at (1, 12, 10240, 64), or at
   --pass-shapes.

    python3 benchmarks/hopper_check.py --revision old.py     # on the device machine, from the repository root

The checks take about 6 minutes on a fresh H100 machine for D = 32 and 64 (session 19: 20 of the 21 unpacked cases in
330 s), mostly the Triton kernels' autotuning at every new shape; --long-only takes about 1.5 minutes, --head-dim 128
about 3 (session 30: its 7 cases in under 200 s).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from attention import THETA, kernels, rel_errors  # this checkout's kernels, installed or not
from hopper_program_cost import load_revision, pass_times

flash = kernels.flash
# (head dim, B, H, Nq, Nk, q_offset, causal, dtype, scale of q and k)
CASES = [
    (d, *case)
    for d in (64, 32)
    for case in [
        (2, 3, 1000, 1000, 0, True, torch.bfloat16, 1.0),
        (1, 2, 777, 777, 0, True, torch.float16, 1.0),
        (1, 2, 300, 1200, 900, True, torch.bfloat16, 1.0),
        (1, 2, 65, 513, 448, True, torch.bfloat16, 1.0),
        (2, 2, 640, 1000, 0, False, torch.bfloat16, 1.0),
        (1, 2, 1, 700, 699, True, torch.bfloat16, 1.0),
        (4, 4, 64, 64, 0, True, torch.bfloat16, 16.0),
        (1, 2, 2048, 2048, 0, True, torch.bfloat16, 1.0),
        (2, 2, 10, 1000, 0, True, torch.bfloat16, 1.0),  # key blocks past every query: zero gradients
        (8, 4, 1100, 1100, 0, True, torch.bfloat16, 1.0),  # 288 blocks, more than the SMs: persistent programs loop
    ]
]
# flash_hopper.LONG_CONFIGS' range (LONG_KEYS = 2048 keys and more; also (1, 2, 2048, 2048) above): odd lengths,
# Nq < Nk, non-causal fp16
CASES += [(64, 1, 2, 4100, 4100, 0, True, torch.bfloat16, 1.0), (64, 1, 2, 300, 5000, 4700, True, torch.bfloat16, 1.0),
          (64, 1, 2, 500, 4500, 0, False, torch.float16, 1.0)]
# D = 128, where the backward passes' consumers split the channels (flash_hopper.channel_parts)
CASES += [(128, *case) for case in [(2, 3, 1000, 1000, 0, True, torch.bfloat16, 1.0),
                                    (1, 2, 777, 777, 0, True, torch.float16, 1.0),
                                    (1, 2, 300, 1200, 900, True, torch.bfloat16, 1.0),
                                    (1, 2, 1, 700, 699, True, torch.bfloat16, 1.0),
                                    (4, 4, 64, 64, 0, True, torch.bfloat16, 16.0),
                                    (2, 2, 10, 1000, 0, True, torch.bfloat16, 1.0),
                                    (1, 2, 4100, 4100, 0, True, torch.bfloat16, 1.0)]]
# q, k and v as the model passes them: views of one (B, N, 3, H, D) projection (rows 3 H D apart)
PACKED_CASES = [(d, 2, 3, 1000, 1000, 0, True, torch.bfloat16, 1.0) for d in (64, 32)]
TIMED = [(8, 12, 1024, 64), (16, 12, 1024, 64), (2, 12, 4096, 64), (1, 12, 10240, 64), (1, 16, 16384, 64),
         (4, 16, 2048, 32), (1, 16, 8192, 32), (4, 16, 2048, 128), (1, 16, 8192, 128)]


@contextmanager
def hopper_kernels(module):
    """flash.py's passes through `module`'s Gluon kernels (None: the Triton kernels everywhere)."""
    saved, saved_env = flash.flash_hopper, os.environ.get("POPE_LM_GLUON")
    os.environ["POPE_LM_GLUON"] = "0" if module is None else "1"
    flash.flash_hopper = module or saved
    try:
        yield
    finally:
        flash.flash_hopper = saved
        if saved_env is None:
            os.environ.pop("POPE_LM_GLUON")
        else:
            os.environ["POPE_LM_GLUON"] = saved_env


def inputs(d, b, h, n_q, n_k, dtype, scale, seed=0, packed=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if packed:  # n_q == n_k
        q, k, v = torch.randn(b, n_q, 3, h, d, device="cuda", generator=g).to(dtype).permute(2, 0, 3, 1, 4)
        q, k = scale * q, scale * k
    else:
        q = (scale * torch.randn(b, h, n_q, d, device="cuda", generator=g)).to(dtype)
        k = (scale * torch.randn(b, h, n_k, d, device="cuda", generator=g)).to(dtype)
        v = torch.randn(b, h, n_k, d, device="cuda", generator=g).to(dtype)
    dout = torch.randn(b, h, n_q, d, device="cuda", generator=g).to(dtype)
    delta = -2 * math.pi * torch.rand(h, d, device="cuda", generator=g)
    return q, k, v, delta, dout


def grads(attention, q, k, v, delta, dout, causal, q_offset):
    leaves = [x.detach().requires_grad_() for x in (q, k, v, delta)]
    out = attention(*leaves, causal=causal, theta=THETA, q_offset=q_offset)
    return (out, *torch.autograd.grad(out, leaves, dout))


def packed_attention(q, k, v, delta, *, causal, theta, q_offset):
    """pope_attention through the op that takes the model's projection whole: q, k, v stacked into (B, N, 3, H, D)."""
    assert q_offset == 0 and q.shape == k.shape
    return kernels.pope_attention_packed(torch.stack((q, k, v)).permute(1, 3, 0, 2, 4), delta, causal=causal,
                                         theta=theta)


def check(cases, variants, packed=False) -> None:
    """With `packed`, q, k and v are views of one projection, and each variant also runs the packed op."""
    print(f"## relative error (norm) of out dq dk dv ddelta against float64{', q k v packed' if packed else ''}")
    attentions = {"": kernels.pope_attention} | ({" packed op": packed_attention} if packed else {})
    for d, b, h, n_q, n_k, q_offset, causal, dtype, scale in cases:
        q, k, v, delta, dout = inputs(d, b, h, n_q, n_k, dtype, scale, packed=packed)
        ref = grads(kernels.pope_attention_reference, *(x.double() for x in (q, k, v, delta, dout)), causal, q_offset)
        line = f"D={d} ({b},{h},{n_q},{n_k}) off={q_offset} causal={causal} {str(dtype)[6:]} x{scale}:"
        for name, module in variants.items():
            for how, attention in attentions.items():
                with hopper_kernels(module):
                    ours = grads(attention, q, k, v, delta, dout, causal, q_offset)
                errors = rel_errors(ours, ref, heads=slice(None))
                line += f" | {name}{how} " + " ".join(f"{e:.1e}" for e in errors.values())
        print(line, flush=True)


def check_compiled_graphs() -> None:
    """Forward and backward in the listed order under torch.compile's CUDA graphs (mode reduce-overhead, as the recipes
    train): the listed order's table, made at the first call while the graphs warm up, must live outside their memory
    pool (flash_hopper._listed_table; session 36 found the 124m recipe stopping at its first step). Three calls (warm
    up, record, replay), each's out, dq, dk, dv and d delta against the eager ones (relative error, norm): 0 but for
    d delta (summed by atomics in no fixed order)."""
    module = head_major_order(listed=True)
    q, k, v, delta, dout = inputs(64, 2, 3, 1000, 1000, torch.bfloat16, 1.0)
    with hopper_kernels(module):
        eager = tuple(x.double() for x in grads(kernels.pope_attention, q, k, v, delta, dout, True, 0))
        module._LISTED_TABLES.clear()
        compiled = torch.compile(kernels.pope_attention, mode="reduce-overhead")
        calls = []
        for _ in range(3):
            errors = rel_errors(grads(compiled, q, k, v, delta, dout, True, 0), eager, heads=slice(None))
            calls.append(" ".join(f"{e:.0e}" for e in errors.values()))
    listed = sum(table is not None for table in module._LISTED_TABLES.values())
    print(f"## listed order under reduce-overhead CUDA graphs ({listed} listed tables): out dq dk dv ddelta against "
          f"eager's, calls 1-3: {' | '.join(calls)}", flush=True)


def time_fwd_bwd(shapes, variants) -> None:
    """The forward alone (no autograd graph) and forward+backward of pope_attention, per variant, at each shape."""
    print("## forward and fwd+bwd CUDA-graph ms (bf16, causal, median)")
    for b, h, n, d in shapes:
        q, k, v, delta, dout = inputs(d, b, h, n, n, torch.bfloat16, 1.0)
        leaves = [x.detach().requires_grad_() for x in (q, k, v, delta)]
        times = {"fwd": {}, "fwd+bwd": {}}
        for name, module in variants.items():
            with hopper_kernels(module):
                def forward(inputs=(q, k, v, delta)):
                    with torch.no_grad():
                        return kernels.pope_attention(*inputs, theta=THETA)

                def fwd_bwd(leaves=leaves, dout=dout):
                    return torch.autograd.grad(kernels.pope_attention(*leaves, theta=THETA), leaves, dout)

                for what, fn in (("fwd", forward), ("fwd+bwd", fwd_bwd)):
                    fn()
                    torch.cuda.synchronize()
                    times[what][name] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        for what, by_name in times.items():
            print(f"({b},{h},{n},{d}) {what}: " + "  ".join(f"{name}={ms:.3f}" for name, ms in by_name.items()),
                  flush=True)


def time_passes(shapes, variants) -> None:
    """Each Gluon pass alone, per Gluon variant, at each (B, H, N) or (B, H, N, D) of `shapes` (D = 64 unless given; by
    default the pretraining shape, where issue 8's step spends them, and a long one: few programs, mostly tiles)."""
    print("## each pass alone, CUDA-graph us (bf16, causal)")
    for b, h, n, d in (shape if len(shape) == 4 else (*shape, 64) for shape in shapes):
        for name, module in variants.items():
            if module is not None:
                times = pass_times(b, h, n, module, peers=False, head_dim=d)
                print(f"({b},{h},{n},{d}) {name}: " + "  ".join(f"{p}={us:.1f}" for p, us in times.items()),
                      flush=True)


def head_major_order(listed: bool):
    """This checkout's Gluon kernels, the forward and the dq pass always in a head-major order (flash_hopper._work):
    the listed one where causal (work_order.choose), else the paired one."""
    module = load_revision(Path(flash.flash_hopper.__file__))
    module.KEYS_IN_L2 = 0.0
    module.LISTED_GAIN = -math.inf if listed else math.inf
    return module


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape from the command line: "B,H,N" or "B,H,N,D"."""
    return tuple(int(x) for x in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revision", type=Path, nargs="*", default=[],
                        help="other revisions' kernels/flash_hopper.py, each timed under its file name")
    parser.add_argument("--no-checks", dest="checks", action="store_false", help="timings only")
    parser.add_argument("--no-timings", dest="timings", action="store_false", help="checks only")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--long-only", action="store_true",
                        help="check only the cases with flash_hopper.LONG_KEYS keys or more (its long configurations)")
    subset.add_argument("--packed-only", action="store_true",
                        help="check only the cases whose q, k and v are views of one projection (and the packed op)")
    parser.add_argument("--no-triton-timings", dest="triton_timings", action="store_false",
                        help="time the Gluon kernels only (the Triton kernels autotune at every new shape: minutes)")
    parser.add_argument("--pass-shapes", nargs="*", type=parse_shape, default=[(16, 12, 1024), (1, 12, 10240)],
                        metavar="B,H,N[,D]", help="shapes (D = 64 unless given) at which each pass is timed alone")
    parser.add_argument("--timed", nargs="*", type=parse_shape, default=TIMED, metavar="B,H,N,D",
                        help="shapes at which the forward and forward+backward are timed")
    parser.add_argument("--head-dim", type=int, help="check only the cases of this head dim")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, datetime.date.today(), flush=True)
    variants = {"triton": None, "gluon": flash.flash_hopper}
    for path in args.revision:
        variants[path.stem] = load_revision(path)
    if args.checks:  # this checkout's kernels, in each order of work; the revisions are timed only
        checked = {name: variants[name] for name in ("triton", "gluon")} | {
            "paired": head_major_order(listed=False), "listed": head_major_order(listed=True)}
        cases, packed_cases = ([case for case in group if args.head_dim in (None, case[0])]
                               for group in (CASES, PACKED_CASES))
        check_compiled_graphs()
        if args.long_only:
            check([case for case in cases if case[4] >= flash.flash_hopper.LONG_KEYS], checked)  # case[4]: Nk
        elif args.packed_only:
            check(packed_cases, checked, packed=True)
        else:
            check(cases, checked)
            check(packed_cases, checked, packed=True)
    if args.timings:
        time_passes(args.pass_shapes, variants)
        time_fwd_bwd(args.timed,
                     variants if args.triton_timings else {k: v for k, v in variants.items() if v is not None})


if __name__ == "__main__":
    main()
