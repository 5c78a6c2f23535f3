"""Could the MLP's matmuls take GELU into their epilogues and beat cuBLAS plus inductor's GELU kernels?

A feasibility measurement for issue 8. In a compiled pope-lm step the MLP runs

    forward:   h = x W1^T (cuBLAS)   a = gelu(h) (inductor)          y = a W2^T
    backward:  dA = dY W2 (cuBLAS)   dH = dA * gelu'(h) (inductor)   ...

and the GELU kernels cost 2.3 ms of the 124M step (`train_throughput_results.md`, session 22): each moves the
(tokens x 4d) tensors through HBM once more. A matmul whose epilogue applies GELU (forward: writes h and a) or
multiplies by gelu'(h) (backward: reads h, writes dH) skips writing and re-reading dA or h. This script times two
fused candidates against cuBLAS plus the compiled elementwise kernel, in one process, at the 124M and 774M MLP
shapes, and checks them against torch:
- plain Triton matmuls, autotuned here, with erf GELU (session 22: half cuBLAS's speed);
- cuBLASLt's own GELU_AUX and DGELU epilogues (`pope_lm.kernels.gelu_mlp`), whose GELU is the tanh approximation;
  for these it also times a whole MLP layer, forward and backward, compiled, against the same layer in torch.

    python benchmarks/gelu_epilogue.py                  # on the GPU
    TRITON_INTERPRET=1 python benchmarks/gelu_epilogue.py --smoke   # the kernels' arithmetic, on the CPU
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pope_lm.kernels.gelu_mlp import gelu_mlp, linear_gelu, matmul_dgelu

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_SQRT1_2 = tl.constexpr(1 / math.sqrt(2))
_INV_SQRT_2PI = tl.constexpr(1 / math.sqrt(2 * math.pi))


def _configs() -> list[triton.Config]:
    if _INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 256, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (256, 128, 8, 3),
                                 (128, 256, 8, 4), (64, 256, 4, 4))]


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def _matmul_gelu_kernel(A, B, H, Out, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                        BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """C = A B (fp32 accumulation). Forward: H = C and Out = gelu(C). Backward: Out = C * gelu'(H), H read.
    H and Out are (M, N) contiguous."""
    pid = tl.program_id(0)
    # grouped order: consecutive programs share B's columns, so B's tiles stay in L2
    group = 8
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (group * n_n)) * group
    rows_in_group = min(n_m - first_m, group)
    pid_m = first_m + (pid % (group * n_n)) % rows_in_group
    pid_n = (pid % (group * n_n)) // rows_in_group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] + k < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    offsets = rm[:, None].to(tl.int64) * N + rn[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if BACKWARD:
        h = tl.load(H + offsets, mask=ok, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(h * _SQRT1_2))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        tl.store(Out + offsets, (acc * (cdf + h * pdf)).to(Out.dtype.element_ty), mask=ok)
    else:
        tl.store(H + offsets, acc.to(H.dtype.element_ty), mask=ok)
        gelu = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))
        tl.store(Out + offsets, gelu.to(Out.dtype.element_ty), mask=ok)


def _launch(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, out: torch.Tensor, backward: bool) -> None:
    m, k = a.shape
    n = b.shape[1]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _matmul_gelu_kernel[grid](a, b, h, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                              BACKWARD=backward)


def up_gelu(x: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x W1^T and a = gelu(h) from one kernel."""
    h = x.new_empty(x.shape[0], w1.shape[0])
    a = torch.empty_like(h)
    _launch(x, w1.t(), h, a, backward=False)
    return h, a


def down_grad_gelu(dy: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dH = (dY W2) * gelu'(h) from one kernel."""
    dh = torch.empty_like(h)
    _launch(dy, w2, h, dh, backward=True)
    return dh


@torch.compile
def _compiled_gelu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(h, approximate=approximate)


@torch.compile
def _compiled_gelu_backward(da: torch.Tensor, h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return torch.ops.aten.gelu_backward(da, h, approximate=approximate)


def _torch_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w1), approximate=approximate), w2)


def _inputs(tokens: int, d: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """x and dY (tokens, d), W1 (4d, d) and W2 (d, 4d), the same for every run."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x, dy = (torch.randn(tokens, d, generator=g).to(device, dtype) for _ in range(2))
    w1 = (torch.randn(4 * d, d, generator=g) * 0.05).to(device, dtype)
    w2 = (torch.randn(d, 4 * d, generator=g) * 0.05).to(device, dtype)
    return x, dy, w1, w2


def check(tokens: int, d: int, dtype: torch.dtype, device: str) -> None:
    """Both kernels against torch in fp32 on the same rounded inputs; prints the relative errors."""
    x, dy, w1, w2 = _inputs(tokens, d, dtype, device)
    h, a = up_gelu(x, w1)
    h_ref = x.float() @ w1.float().t()
    dh = down_grad_gelu(dy, w2, h)
    dh_ref = torch.ops.aten.gelu_backward(dy.float() @ w2.float(), h.float())
    checks = [("h", h, h_ref), ("a", a, F.gelu(h_ref)), ("dH", dh, dh_ref)]
    if device == "cuda":
        g_lt, h_lt = linear_gelu(x, w1)
        dh_lt = matmul_dgelu(dy, w2, h_lt)
        checks += [("cuBLASLt h", h_lt, h_ref), ("cuBLASLt g", g_lt, F.gelu(h_ref, approximate="tanh")),
                   ("cuBLASLt dH", dh_lt, torch.ops.aten.gelu_backward(dy.float() @ w2.float(), h_lt.float(),
                                                                      approximate="tanh"))]
    for name, got, ref in checks:
        err = ((got.float() - ref).norm() / ref.norm()).item()
        print(f"  {name}: relative error {err:.1e}", flush=True)
        if err > (2e-2 if dtype != torch.float32 else 1e-4):
            raise SystemExit(f"{name} is wrong: relative error {err:.1e}")


def bench(tokens: int, d: int) -> None:
    x, dy, w1, w2 = _inputs(tokens, d, torch.bfloat16, "cuda")
    h = x @ w1.t()
    flops = 2 * tokens * d * 4 * d
    cases = {
        "forward: cuBLAS x W1^T": lambda: x @ w1.t(),
        "forward: compiled gelu(h)": lambda: _compiled_gelu(h),
        "forward: fused (writes h and a)": lambda: up_gelu(x, w1),
        "backward: cuBLAS dY W2": lambda: dy @ w2,
        "backward: compiled gelu_backward(dA, h)": lambda: _compiled_gelu_backward(dy @ w2, h),
        "backward: fused (reads h, writes dH)": lambda: down_grad_gelu(dy, w2, h),
        "forward: compiled gelu(h), tanh": lambda: _compiled_gelu(h, "tanh"),
        "forward: cuBLASLt GELU_AUX (writes h and g)": lambda: linear_gelu(x, w1),
        "backward: compiled gelu_backward(dA, h), tanh": lambda: _compiled_gelu_backward(dy @ w2, h, "tanh"),
        "backward: cuBLASLt DGELU (reads h, writes dH)": lambda: matmul_dgelu(dy, w2, h),
    }
    times = {name: triton.testing.do_bench(fn, warmup=50, rep=200) for name, fn in cases.items()}
    for name in ("backward: compiled gelu_backward(dA, h)", "backward: compiled gelu_backward(dA, h), tanh"):
        times[name] -= times["backward: cuBLAS dY W2"]  # its own kernel only
    print(f"tokens {tokens}, d {d} -> {4 * d} (bf16, {flops / 1e9:.0f} GFLOP a matmul)")
    for name, ms in times.items():
        tflops = f"  {flops / ms / 1e9:6.0f} TFLOP/s" if "compiled" not in name else ""
        print(f"  {name:46} {ms * 1e3:7.1f} us{tflops}", flush=True)
    # (side, matmul, GELU kernel, fused candidate)
    pairs = [("forward", "cuBLAS x W1^T", "compiled gelu(h)", "fused (writes h and a)"),
             ("forward", "cuBLAS x W1^T", "compiled gelu(h), tanh", "cuBLASLt GELU_AUX (writes h and g)"),
             ("backward", "cuBLAS dY W2", "compiled gelu_backward(dA, h)", "fused (reads h, writes dH)"),
             ("backward", "cuBLAS dY W2", "compiled gelu_backward(dA, h), tanh", "cuBLASLt DGELU (reads h, writes dH)")]
    for side, matmul, gelu, candidate in pairs:
        unfused, fused = times[f"{side}: {matmul}"] + times[f"{side}: {gelu}"], times[f"{side}: {candidate}"]
        print(f"  {side}: cuBLAS + {gelu} {unfused * 1e3:.1f} us, {candidate} {fused * 1e3:.1f} us "
              f"({fused / unfused - 1:+.1%})", flush=True)
    bench_layer(x, dy, w1, w2)


def bench_layer(x: torch.Tensor, dy: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    """One MLP layer's forward and backward, compiled: torch (erf and tanh GELU) against `gelu_mlp`.

    Replayed as a CUDA graph, as `trainer.compile_mode=reduce-overhead` runs a step: launched one by one, a layer's
    ~1 ms of GPU work waits on the host (session 27 measured gelu_mlp 18% slower that way, while its GPU time fell)."""
    x, w1, w2 = (t.detach().requires_grad_() for t in (x, w1, w2))
    layers = {"torch, erf GELU": torch.compile(lambda *a: _torch_mlp(*a, "none")),
              "torch, tanh GELU": torch.compile(lambda *a: _torch_mlp(*a, "tanh")),
              "gelu_mlp (cuBLASLt epilogues)": torch.compile(gelu_mlp)}

    def step(layer):
        layer(x, w1, w2).backward(dy)

    times = {}
    for name, layer in layers.items():
        step(layer)  # compiles outside the graph capture
        times[name] = triton.testing.do_bench_cudagraph(lambda layer=layer: step(layer), rep=100,
                                                        grad_to_none=[x, w1, w2])
    for name, ms in times.items():
        print(f"  layer forward + backward, {name:30} {ms * 1e3:7.1f} us "
              f"({ms / times['torch, tanh GELU'] - 1:+.1%} against torch, tanh)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="check the kernels on small shapes only (CPU under "
                                                             "TRITON_INTERPRET=1)")
    parser.add_argument("--shapes", nargs="+", default=["16384,768", "8192,1280"], metavar="TOKENS,D",
                        help="the MLP's tokens per micro-batch and model width (124M at 16 x 1024, 774M at 8 x 1024)")
    args = parser.parse_args()
    if args.smoke:
        check(70, 48, torch.float32, "cpu")
        check(70, 48, torch.float16, "cpu")
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for tokens in (1, 3, 70):  # decoding's single rows, and partial tiles
        check(tokens, 48, torch.bfloat16, "cuda")
    for shape in args.shapes:
        tokens, d = (int(v) for v in shape.split(","))
        check(tokens, d, torch.bfloat16, "cuda")
        bench(tokens, d)


if __name__ == "__main__":
    main()
