r"""Nsight Compute's view of our attention kernels at one shape: where the time goes inside them.

The device machine's CUDA toolkit has `ncu`. This script autotunes and warms the kernels up first, then runs one
forward+backward inside the NVTX range "profiled", so that ncu sees exactly one launch of each kernel with the
configuration the autotuner picked. One device call (`nvidia-h100-x1`, ~45 s) like the one behind
results/attention-h100-2026-11-26-session10/5-ncu-10240.txt (which also asked for sm__inst_executed_pipe_*):

    stalls='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
    pipes='regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active'
    ncu --nvtx --nvtx-include "profiled/" --kernel-name regex:"_fwd_kernel|_dq_kernel|_dkdv_kernel|cudnn" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats --section Occupancy \
        --section InstructionStats --metrics "$stalls,$pipes" \
        python3 benchmarks/attention_profile.py --shape 1 12 10240 64 --cudnn-forward > "$OUT/ncu.txt"
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from attention import THETA, kernels  # this checkout's kernels, installed or not


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 12, 10240, 64], metavar=("B", "H", "N", "D"))
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--cudnn-forward", action="store_true",
                        help="also profile the cuDNN attention forward at the same shape (peer a's kernel, no RoPE)")
    args = parser.parse_args()
    b, h, n, d = args.shape
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype) for _ in range(4))
    delta = -2 * math.pi * torch.rand(h, d, device="cuda", generator=g)

    flash = kernels.flash
    freqs = kernels.reference.pope_frequencies(d, THETA, "cuda")
    sm_scale = kernels.reference.softmax_scale(d, None)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))

    def run() -> None:
        # the custom op's two halves, called directly: autograd would launch the backward from its own thread, and
        # NVTX ranges are per thread
        out, lse = flash._forward(q, k, v, delta, freqs, True, sm_scale, 0)
        flash._backward(dout, q, k, v, delta, freqs, out, lse, True, sm_scale, 0, dq, dk, dv)
        if args.cudnn_forward:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

    for _ in range(2):  # autotuning, then one run with the chosen configurations
        run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profiled")
    run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print(f"profiled one forward+backward at B={b} H={h} N={n} D={d} {args.dtype}")


if __name__ == "__main__":
    main()
