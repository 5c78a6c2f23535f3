"""The head's loss on the GPU: kernels/cross_entropy.py's fused kernel against compiled F.cross_entropy, in one run.

For the head of each recipe at its micro-batch (x: tokens x d_model, W: 50,304 x d_model, bf16) it reports
1. the relative errors of the loss, dx and dW of both against the same loss computed in fp32 from the bf16 inputs;
2. forward+backward ms (median, triton.testing.do_bench) and the peak memory above the inputs of
     compiled   torch.compile(F.cross_entropy(F.linear(x, W).float(), t)): what pope-lm's model ran before and what
                the nanoGPT peer of train_throughput.py runs,
     fused      linear_cross_entropy (the logits read once, turned into their gradient in place);
3. the fused kernel alone (fused forward less the x W^T matmul alone) and the bandwidth it reaches: it reads the bf16
   logits and writes the gradient over them, 2 x tokens x vocab x 2 bytes.

    python3 benchmarks/cross_entropy.py          # on the device machine, from the repository root
    python3 benchmarks/cross_entropy.py --sweep  # also the fused forward at each chunk size and warp count
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from attention import bench, environment, peak_extra_bytes

from pope_lm.kernels import cross_entropy
from pope_lm.kernels.cross_entropy import linear_cross_entropy

VOCAB = 50304
SHAPES = {"124m (micro-batch 16)": (16 * 1024, 768), "774m (micro-batch 8)": (8 * 1024, 1280)}


def compiled_loss():
    return torch.compile(lambda x, w, t: F.cross_entropy(F.linear(x, w).float(), t))


def fwd_bwd(loss_fn, x, w, t):
    return lambda: torch.autograd.grad(loss_fn(x, w, t), (x, w))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def bench_head(name: str, tokens: int, d: int) -> str:
    """Prints the head's table rows; returns the line on the fused kernel alone."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, d, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(VOCAB, d, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, VOCAB, (tokens,), device="cuda", generator=g)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref_loss = F.cross_entropy(F.linear(x32, w32), t)
    ref = (ref_loss.detach(), *torch.autograd.grad(ref_loss, (x32, w32)))
    del x32, w32, ref_loss
    for variant, loss_fn in (("compiled", compiled_loss()), ("fused", linear_cross_entropy)):
        loss = loss_fn(x, w, t)
        got = (loss.detach(), *torch.autograd.grad(loss, (x, w)))
        del loss
        errors = " | ".join(f"{rel(a, b):.1e}" for a, b in zip(got, ref, strict=True))
        step = fwd_bwd(loss_fn, x, w, t)
        ms = bench(step)
        print(f"| {name} | {variant} | {errors} | {ms:.3f} | {peak_extra_bytes(step) / 2**30:.2f} |", flush=True)
    fused_fwd = bench(lambda: linear_cross_entropy(x, w, t))  # x and w need grad: the kernel writes G
    with torch.no_grad():
        matmul = bench(lambda: x @ w.t())
    kernel_ms = fused_fwd - matmul
    return (f"{name}: fused forward {fused_fwd:.3f} ms, x W^T alone {matmul:.3f} ms, kernel ~{kernel_ms:.3f} ms = "
            f"{2 * tokens * VOCAB * 2 / kernel_ms / 1e6:.0f} GB/s")


def sweep(tokens: int, d: int) -> None:
    """The fused forward's ms at each chunk size (_BLOCK) and warp count (_NUM_WARPS) of the kernel."""
    x = torch.randn(tokens, d, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(VOCAB, d, device="cuda") * 0.02).bfloat16()
    t = torch.randint(0, VOCAB, (tokens,), device="cuda")
    chosen = cross_entropy._BLOCK, cross_entropy._NUM_WARPS
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            cross_entropy._BLOCK, cross_entropy._NUM_WARPS = block, warps
            print(f"sweep {tokens} x {d}: BLOCK {block:5} warps {warps:2}: fused forward "
                  f"{bench(lambda: linear_cross_entropy(x, w, t)):.3f} ms", flush=True)
    cross_entropy._BLOCK, cross_entropy._NUM_WARPS = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    print(environment())
    print("| head | variant | loss err | dx err | dW err | fwd+bwd ms | peak extra GiB |")
    print("|---|---|---|---|---|---|---|")
    kernel_lines = [bench_head(name, tokens, d) for name, (tokens, d) in SHAPES.items()]
    print("\n".join(kernel_lines))
    if args.sweep:
        sweep(*SHAPES["124m (micro-batch 16)"])


if __name__ == "__main__":
    main()
