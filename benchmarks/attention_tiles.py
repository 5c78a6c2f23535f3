"""Registers, local memory and time of each tile configuration of the Triton attention passes, for one input dtype.

On the H100, fp16/bf16 attention runs the Gluon passes (kernels/flash_hopper.py); fp32 inputs (and other GPUs) run
kernels/flash.py's Triton passes, autotuned over `flash._BLOCKS` (fp32: `flash._FP32_BLOCKS`). A configuration whose
registers spill needs local memory per thread, and CUDA reserves the largest such need for every thread the card can
hold (SMs x 2048), for the rest of the process: one launch of a badly spilling candidate during autotuning costs
gigabytes (benchmarks/local_memory.py). This script compiles and times each candidate alone, one pass at a time, the
other two passes held at a fixed configuration, and prints its local memory per thread and across the card. Passes
other than the forward are timed forward and backward together.

    python benchmarks/attention_tiles.py --dtype float32 --shape 2,12,1024,64       # on a GPU
    python benchmarks/attention_tiles.py --dtype float32 --pass fwd --tiles 32,32,4,1 64,32,4,1
"""

from __future__ import annotations

import argparse

import torch
import triton
from local_memory import loaded_triton_kernels
from train_throughput import resident_threads

from pope_lm.kernels import flash, pope_attention

PASSES = {"fwd": "_fwd_tuned", "dq": "_dq_tuned", "dkdv": "_dkdv_tuned"}
# Tiles to survey (BLOCK_M, BLOCK_N, num_warps, num_stages): the bf16 candidates at D = 64 and smaller ones.
DEFAULT_TILES = [(16, 32, 4, 1), (32, 32, 4, 1), (32, 64, 4, 1), (64, 32, 4, 1), (32, 32, 4, 2), (64, 64, 4, 1),
                 (64, 64, 4, 3), (32, 128, 8, 2), (64, 64, 8, 2), (128, 64, 8, 3)]


def _pin(name: str, head_dim: int, tile: tuple[int, int, int, int]) -> None:
    """Make `name`'s autotuner run exactly `tile`, forgetting what it chose before."""
    m, n, warps, stages = tile
    tuned = getattr(flash, PASSES[name])
    tuned.configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages,
                                   pre_hook=tuned.configs[0].pre_hook)]
    for table in (flash._BLOCKS, flash._FP32_BLOCKS):
        for entry in ("dkdv_dq", name) if name == "dkdv" else (name,):
            table[entry][max(64, head_dim)] = [tile]
    tuned.cache.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--shape", default="2,12,1024,64", help="B,H,N,D")
    parser.add_argument("--pass", dest="passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    parser.add_argument("--tiles", nargs="+", default=None, metavar="M,N,WARPS,STAGES")
    parser.add_argument("--hold", default="32,32,4,1", metavar="M,N,WARPS,STAGES",
                        help="the tile the passes not being surveyed run with")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_tiles.py times CUDA kernels: it needs a GPU")
    batch, heads, n, head_dim = (int(v) for v in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles] if args.tiles else DEFAULT_TILES
    hold = tuple(int(v) for v in args.hold.split(","))
    threads = resident_threads(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype, generator=g, requires_grad=True)
               for _ in range(3))
    delta = torch.zeros(heads, head_dim, device="cuda", requires_grad=True)
    dout = torch.randn_like(q)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype} "
          f"{args.shape} causal; local memory across the card = bytes per thread x {threads:,} threads")

    def step(backward: bool) -> None:
        out = pope_attention(q, k, v, delta, causal=True)
        if backward:
            torch.autograd.grad(out, (q, k, v, delta), dout)

    for name in args.passes:
        for other in PASSES:
            _pin(other, head_dim, hold)
        print(f"{name} (the other passes at {hold}):")
        backward = name != "fwd"
        for tile in tiles:
            _pin(name, head_dim, tile)
            before = set(loaded_triton_kernels())
            try:
                step(backward)
                ms = triton.testing.do_bench(lambda b=backward: step(b), warmup=5, rep=50)
            except Exception as exc:  # a tile that does not compile or launch (shared memory): report, go on
                print(f"  {tile}: failed: {str(exc).splitlines()[0][:100]}", flush=True)
                continue
            new = [info for key, info in loaded_triton_kernels().items()
                   if key not in before and info[0] == f"_{name}_kernel"]
            local, regs = (max(i[1] for i in new), max(i[2] for i in new)) if new else (0, 0)
            print(f"  {tile}: {ms * 1e3:9.1f} us  {regs:3d} registers  {local:7,d} B local "
                  f"({local * threads / 2**30:5.2f} GiB)", flush=True)


if __name__ == "__main__":
    main()
