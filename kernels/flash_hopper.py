"""PoPE attention's forward on Hopper (sm_90) in Gluon: a producer warpgroup builds the key tiles.

Same contract and arithmetic as flash.py's forward (see its docstring for the math); only the schedule differs.
In the Triton forward the warps that run the softmax and the tensor-core products also build every streamed key
tile's Cartesian halves kc = mu_k cos, ks = mu_k sin (load mu, multiply by the phases, convert, store to shared
memory, barrier, advance the phases): measured, 40% of its time (benchmarks/attention_notes.md, session 10). Here
each program of 128 query rows runs three warpgroups (warp specialization):

    producer     for each key tile: mu_k (from the prepass) x the phases' cos and sin, and V, into one stage of a
                 ring of shared-memory buffers; then signals the stage ready (mbarrier) and advances the phases.
    consumer x2  64 query rows each: waits for a stage, S = qc kc^T + qs ks^T on the tensor cores, online softmax,
                 O += P V, then releases the stage (mbarrier; the producer waits for both consumers).

The producer's work then runs beside the consumers' instead of before it, and one build serves 128 query rows.
Triton's own warp specialization does not split this loop on Hopper (the key tiles are built in registers, not
loaded by TMA), hence Gluon, Triton's lower-level dialect with explicit layouts, shared memory and mbarriers.

Gluon kernels do not run in Triton's interpreter: on the CPU (CI) the tests compile this kernel for sm_90a and check
its registers; its numbers are checked on the GPU by benchmarks/attention.py. flash.py calls it where `handles` says
so and keeps the Triton forward for every other case (other GPUs, fp32, head dims not listed in CONFIGS).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# triton 3.6 calls the barrier of a warp group's threads thread_barrier, 3.7 and later barrier
_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

_TWO_PI_HI = gl.constexpr(6.28125)  # Cody-Waite split of 2 pi, as in flash.py
_TWO_PI_LO = gl.constexpr(2 * math.pi - 6.28125)
_INV_TWO_PI = gl.constexpr(1 / (2 * math.pi))
_LN2 = gl.constexpr(math.log(2))
_LOG2E = gl.constexpr(math.log2(math.e))

BLOCK_M = 128  # query rows per program: two consumer warpgroups of 64 (one wgmma M each)


@dataclass(frozen=True)
class Config:
    """Per head dim: keys per tile, ring stages, and the registers per thread of each consumer and of the producer
    (3 warpgroups of 128 threads share the SM's 64K; the producer holds its tile's phases, 2 x block_n x D fp32)."""
    block_n: int
    stages: int
    consumer_regs: int
    producer_regs: int


# Measured on an H100 (benchmarks/attention_notes.md, session 11); tests/test_flash_hopper.py checks that each
# compiles without spills. At D = 128 every configuration tried spilled (flash.py's forward runs there).
CONFIGS = {
    32: Config(block_n=64, stages=2, consumer_regs=176, producer_regs=152),
    64: Config(block_n=64, stages=2, consumer_regs=176, producer_regs=152),
}
_MAXNREG = 168  # 3 warpgroups x 128 threads x 168 = 64,512 of the SM's 65,536 registers


def handles(q: torch.Tensor) -> bool:
    """Whether this forward runs for q: fp16/bf16 on an sm_90 GPU at a head dim in CONFIGS, unless POPE_LM_GLUON=0."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in CONFIGS
            and torch.cuda.get_device_capability(q.device) == (9, 0) and os.environ.get("POPE_LM_GLUON", "1") != "0")


@gluon.jit
def _approx(x, OP: gl.constexpr):
    """The special-function unit's one-instruction cos / sin / lg2 (accurate on flash.py's reduced arguments)."""
    return gl.inline_asm_elementwise(OP + ".approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _cos_sin(phase):
    turns = gl.floor(phase * _INV_TWO_PI + 0.5)
    reduced = phase - turns * _TWO_PI_HI - turns * _TWO_PI_LO  # in [-pi, pi]
    return _approx(reduced, "cos"), _approx(reduced, "sin")


@gluon.jit
def _softplus(x):
    return gl.maximum(x, 0.0) + _LN2 * _approx(1.0 + gl.exp2(-gl.abs(x) * _LOG2E), "lg2")


@gluon.jit
def _consumer(Q, MuK, V, Freqs, Delta, Out, Lse, stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn,
              b, h, bh, start_m, n_q, n_k, q_offset, qk_scale, n_tiles, qc_s, qs_s, kc_s, ks_s, v_s, ready, empty,
              CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              WG: gl.constexpr):
    """Warpgroup WG's 64 query rows against the staged key tiles: scores, online softmax, P V; writes out and lse."""
    ROWS: gl.constexpr = 64
    dtype: gl.constexpr = Out.dtype.element_ty
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_N, 16])
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=2)

    # the queries' halves, built as flash.py's _query_block does (mu rounded first, sm_scale log2(e) folded in)
    r0 = start_m + ROWS * WG
    rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, blocked))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blocked))
    q = gl.load(Q + b.to(gl.int64) * stride_qb + h * stride_qh + gl.expand_dims(rows, 1) * stride_qn
                + gl.expand_dims(d, 0), mask=gl.expand_dims(rows < n_q, 1), other=0.0)
    cos, sin = _cos_sin(gl.expand_dims((q_offset + rows).to(gl.float32), 1) * gl.expand_dims(gl.load(Freqs + d), 0))
    mu_q = _softplus(q.to(gl.float32)).to(dtype).to(gl.float32)
    qc = qc_s.index(WG)
    qs = qs_s.index(WG)
    qc.store((mu_q * (cos * qk_scale)).to(dtype))
    qs.store((mu_q * (sin * qk_scale)).to(dtype))
    fence_async_shared()  # generic-proxy stores, read next by the tensor cores (async proxy)
    _barrier()

    if CAUSAL:  # this warpgroup's keys end before the program's (the other warpgroup's rows come later)
        hi = gl.minimum(q_offset + r0 + ROWS, n_k)
        full = gl.minimum(q_offset + r0 + 1, n_k) // BLOCK_N * BLOCK_N  # tiles from here on need the mask
    else:
        hi = n_k
        full = n_k // BLOCK_N * BLOCK_N
    my_tiles = gl.cdiv(hi, BLOCK_N)
    q_pos = q_offset + r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_mma))

    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_mma)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_mma))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_mma))
    s_init = gl.zeros([ROWS, BLOCK_N], gl.float32, s_mma)
    for t in range(my_tiles):
        stage = t % STAGES
        mbarrier.wait(ready.index(stage), (t // STAGES) & 1)
        s = warpgroup_mma(qc, kc_s.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
        s = warpgroup_mma(qs, ks_s.index(stage).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        if t * BLOCK_N >= full:
            cols = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_mma))
            keep = gl.expand_dims(cols < n_k, 0)
            if CAUSAL:
                keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(q_pos, 1))
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_mma)), 1)
        # P V waited for at once: with a wgmma still reading P's registers, ptxas serializes every wgmma (the next
        # scores would reuse them); the other consumer and the producer fill the tensor cores' wait instead
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_s.index(stage), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(stage), count=1)

    out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_mma)), 1)
    o_rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_mma))
    o_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_mma))
    gl.store(Out + gl.expand_dims(bh.to(gl.int64) * n_q + o_rows, 1) * HEAD_DIM + gl.expand_dims(o_d, 0),
             out.to(dtype), mask=gl.expand_dims(o_rows < n_q, 1))
    lse_rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_mma))
    gl.store(Lse + bh.to(gl.int64) * n_q + lse_rows, m_i + gl.log2(l_i), mask=lse_rows < n_q)


@gluon.jit
def _producer(Q, MuK, V, Freqs, Delta, Out, Lse, stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn,
              b, h, bh, start_m, n_q, n_k, q_offset, qk_scale, n_tiles, qc_s, qs_s, kc_s, ks_s, v_s, ready, empty,
              CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              WG: gl.constexpr):
    """The program's key tiles in order: kc, ks and V into the ring's stages."""
    dtype: gl.constexpr = Out.dtype.element_ty
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    key_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blocked))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blocked))
    freqs = gl.load(Freqs + d)
    # key phases s theta + delta of the first tile, advanced a tile at a time by angle addition (as in flash.py)
    cos, sin = _cos_sin(gl.expand_dims(key_rows.to(gl.float32), 1) * gl.expand_dims(freqs, 0)
                        + gl.expand_dims(gl.load(Delta + h * HEAD_DIM + d), 0))
    step_cos, step_sin = _cos_sin(BLOCK_N * freqs)
    step_cos = gl.expand_dims(step_cos, 0)
    step_sin = gl.expand_dims(step_sin, 0)
    mu_base = MuK + bh.to(gl.int64) * n_k * HEAD_DIM
    v_base = V + b.to(gl.int64) * stride_vb + h * stride_vh
    for t in range(n_tiles):
        rows = t * BLOCK_N + key_rows
        ok = gl.expand_dims(rows < n_k, 1)  # past the keys: zeros (their scores are masked)
        mu = gl.load(mu_base + gl.expand_dims(rows, 1) * HEAD_DIM + gl.expand_dims(d, 0), mask=ok, other=0.0)
        v = gl.load(v_base + gl.expand_dims(rows, 1) * stride_vn + gl.expand_dims(d, 0), mask=ok, other=0.0)
        stage = t % STAGES
        mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)  # both consumers are done with its last tile
        mu = mu.to(gl.float32)
        kc_s.index(stage).store((mu * cos).to(dtype))
        ks_s.index(stage).store((mu * sin).to(dtype))
        v_s.index(stage).store(v)
        fence_async_shared()  # generic-proxy stores, read next by the tensor cores (async proxy)
        mbarrier.arrive(ready.index(stage), count=1)
        cos, sin = cos * step_cos - sin * step_sin, sin * step_cos + cos * step_sin


@gluon.jit
def _fwd_kernel(Q, MuK, V, Freqs, Delta, Out, Lse,
                stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn,
                n_heads, n_q, n_k, q_offset, qk_scale,
                CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    ROWS: gl.constexpr = 64
    dtype: gl.constexpr = Out.dtype.element_ty
    # Causal: the last query blocks see the most keys; launch them first so the short ones fill the tail.
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0) if CAUSAL else gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    start_m = pid_m * (2 * ROWS)
    n_tiles = gl.cdiv(gl.minimum(q_offset + start_m + 2 * ROWS, n_k) if CAUSAL else n_k, BLOCK_N)

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    qc_s = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    qs_s = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    kc_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_layout)
    ks_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_layout)
    v_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # released by both consumers
    # A consumer whose rows end a tile earlier never takes the program's last tile: no tile after it reuses a stage
    # (n_tiles - that consumer's tiles <= 1 < STAGES), so nothing waits for its release.

    # Worker partitions share one signature, and Gluon passes constexprs to them only as elements of a literal
    # tuple: hence the repetition (the last element is the consumer's warpgroup; the producer ignores it).
    gl.warp_specialize([
        (_consumer, (Q, MuK, V, Freqs, Delta, Out, Lse, stride_qb, stride_qh, stride_qn, stride_vb, stride_vh,
                     stride_vn, b, h, bh, start_m, n_q, n_k, q_offset, qk_scale, n_tiles,
                     qc_s, qs_s, kc_s, ks_s, v_s, ready, empty, CAUSAL, HEAD_DIM, BLOCK_N, STAGES, 0)),
        (_consumer, (Q, MuK, V, Freqs, Delta, Out, Lse, stride_qb, stride_qh, stride_qn, stride_vb, stride_vh,
                     stride_vn, b, h, bh, start_m, n_q, n_k, q_offset, qk_scale, n_tiles,
                     qc_s, qs_s, kc_s, ks_s, v_s, ready, empty, CAUSAL, HEAD_DIM, BLOCK_N, STAGES, 1)),
        (_producer, (Q, MuK, V, Freqs, Delta, Out, Lse, stride_qb, stride_qh, stride_qn, stride_vb, stride_vh,
                     stride_vn, b, h, bh, start_m, n_q, n_k, q_offset, qk_scale, n_tiles,
                     qc_s, qs_s, kc_s, ks_s, v_s, ready, empty, CAUSAL, HEAD_DIM, BLOCK_N, STAGES, 2)),
    ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def launch_options(head_dim: int) -> dict:
    """_fwd_kernel's constexprs and launch options for a head dim in CONFIGS."""
    c = CONFIGS[head_dim]
    return dict(HEAD_DIM=head_dim, BLOCK_N=c.block_n, STAGES=c.stages,
                CONSUMER_REGS=c.consumer_regs, PRODUCER_REGS=c.producer_regs, num_warps=4, maxnreg=_MAXNREG)


def forward(q: torch.Tensor, mu_k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor, delta: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, causal: bool, qk_scale: float, q_offset: int) -> None:
    """flash.py's forward from the keys' prepass on: q, v (B, H, N, D) with unit last stride, mu_k (B, H, Nk, D)
    contiguous, delta (H, D) contiguous; writes out (B, H, Nq, D) and lse (B, H, Nq), log2 units, as flash.py's."""
    batch, heads, n_q, head_dim = q.shape
    _fwd_kernel[(triton.cdiv(n_q, BLOCK_M), batch * heads)](
        q, mu_k, v, freqs, delta, out, lse, *q.stride()[:3], *v.stride()[:3], heads, n_q, v.shape[2], q_offset,
        qk_scale, CAUSAL=causal, **launch_options(head_dim))
