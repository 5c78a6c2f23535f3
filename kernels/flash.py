"""PoPE flash attention in Triton: forward and backward, rotating q and k in registers.

Per head, query row i sits at position t = q_offset + i and key row j at position s = j:

    a[i, j] = sm_scale * sum_c mu_q[i, c] mu_k[j, c] cos((s - t) theta_c + delta_c)
            = sm_scale * (qc . kc + qs . ks)[i, j]
    mu = softplus(x),  qc = mu_q cos(t theta),  qs = mu_q sin(t theta),
                       kc = mu_k cos(s theta + delta),  ks = mu_k sin(s theta + delta)

so Q K^T becomes two D-wide products, qc kc^T + qs ks^T. The kernels read q and k at width D and build
qc, qs, kc, ks tile by tile in fp32 registers (softplus, cos, sin), then cast them to the input dtype for
the tensor cores. Nothing 2D-wide ever reaches device memory; the backward keeps q, k, v, out and the
log-sum-exp only, as FlashAttention-2 does.

The backward's P = exp2(S - lse) needs S recomputed from the very halves the forward rounded, as FlashAttention
recomputes Q K^T from the same bf16 Q and K: halves rounded differently move S by ~|S| eps, and P by a factor
e^(|S| eps) (random bf16 inputs with logits up to 100: 8% rms, up to 1.8x; up to 500: 35% rms). So every pass
builds a row's halves alike, on whichever side it is: mu rounded to the input dtype (the streamed side reads it so
from the prepass), times cos and sin with sm_scale log2(e) on the query side, rounded again.

Passes (FlashAttention-2 structure; "stationary" rows stay in registers, "streamed" rows are loaded tile
by tile in the inner loop):
    forward   queries stationary, keys streamed: online softmax, stores out and the log2-sum-exp.
    dq        queries stationary, keys streamed: recomputes P, dS = P (dP - D) with D = rowsum(dO * O)
              (computed here and stored for the next pass), accumulates dS kc and dS ks.
    dk, dv    keys stationary, queries streamed: recomputes P and dS, accumulates dV = P^T dO, dS^T qc and
              dS^T qs; d delta = sum over rows of (dS^T qs) kc - (dS^T qc) ks, added atomically in fp32.
The chain rule through the polar map (pope.md): with gc = sm_scale dS kc, gs = sm_scale dS ks,
    dq = sigmoid(q) (cos(t theta) gc + sin(t theta) gs),  and the same for k with its own phase.

On an H100 (sm_90), for fp16/bf16 at head dims 32, 64 and 128, flash_hopper.py runs these passes instead (dk/dv:
causal only): the same arithmetic in Gluon, with a producer warpgroup building the streamed tiles beside two consumer
warpgroups (forward+backward 23% less time at N = 10240, D = 64, and 33% at (4, 16, 2048, 128);
benchmarks/attention_notes.md, sessions 11, 30 and 31). This file's kernels serve every other case, and the CPU tests
through Triton's interpreter.

Streamed tiles need cos and sin of every element. Computing them directly would cost two special-function
(SFU) ops per element on top of softplus and the softmax exponentials, and the SFU already bounds flash
attention at head dim 64. Instead each inner loop computes the phases of its first tile directly and
advances them to the next tile by angle addition with the D-vector cos/sin(BLOCK theta): four FMAs per
element. Phases are fp32 and reduced to [-pi, pi] before cos/sin, where the GPU's one-op approximations
are accurate.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from .reference import _check_shapes, pope_frequencies, softmax_scale, split_qkv

try:  # Gluon, Triton's explicit dialect: the Hopper kernels (flash_hopper.py) need its warp specialization
    from . import flash_hopper
except ImportError:  # a Triton without Gluon: this file's kernels run everywhere
    flash_hopper = None


def _on_hopper(kernel: str, q: torch.Tensor, causal: bool) -> bool:
    """Whether flash_hopper.py runs the pass `kernel` for q instead of this file's kernel."""
    return flash_hopper is not None and flash_hopper.handles(kernel, q, causal)

__all__ = ["pope_attention"]

HEAD_DIMS = (32, 64, 128)

# Triton fixes compile-or-interpret for all its @jit functions, its own library's included, when the
# process first imports it: TRITON_INTERPRET=1 must be set before then. Ask the library which it chose.
_INTERPRETED = isinstance(tl.zeros, InterpretedFunction)
# On the GPU, tl.cos, tl.sin and tl.log2 are libdevice's exact versions (tens of instructions each, with a
# slow-path loop for huge arguments); the hardware approximations (one SFU op) are accurate on the reduced
# arguments used here. The interpreter has no libdevice, hence the switch.
_FAST_MATH = tl.constexpr(not _INTERPRETED)

# 2 pi split so that turns * _TWO_PI_HI is exact in fp32 for |phase| < 2^16 rad (Cody-Waite reduction).
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(2 * math.pi - 6.28125)
_INV_TWO_PI = tl.constexpr(1 / (2 * math.pi))
_LN2 = tl.constexpr(math.log(2))
_LOG2E = tl.constexpr(math.log2(math.e))


# ---------------------------------------------------------------------------------------------------------
# Elementwise helpers (fp32)


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), in base 2 (the hardware's exp2/log2); 1 + e^-|x| is in [1, 2]
    one_plus = 1.0 + tl.exp2(-tl.abs(x) * _LOG2E)
    log2 = libdevice.fast_log2f(one_plus) if _FAST_MATH else tl.log2(one_plus)
    return tl.maximum(x, 0.0) + _LN2 * log2


@triton.jit
def _cos_sin(phase):
    turns = tl.floor(phase * _INV_TWO_PI + 0.5)
    reduced = phase - turns * _TWO_PI_HI - turns * _TWO_PI_LO  # in [-pi, pi]
    if _FAST_MATH:
        cos, sin = libdevice.fast_cosf(reduced), libdevice.fast_sinf(reduced)
    else:
        cos, sin = tl.cos(reduced), tl.sin(reduced)
    return cos, sin


@triton.jit
def _phases(start, BLOCK: tl.constexpr, freqs, bias):
    """cos and sin of (start + r) theta_c + bias_c for the rows r = 0 .. BLOCK-1 of a tile: (BLOCK, D) each."""
    pos = (start + tl.arange(0, BLOCK)).to(tl.float32)
    return _cos_sin(pos[:, None] * freqs[None, :] + bias[None, :])


@triton.jit
def _rotate(cos, sin, step_cos, step_sin):
    """cos and sin of (a + b) from those of a and the D-vectors of b (angle addition).

    Advances a streamed tile's phases to the next tile, in place of two SFU ops per element. One rounding
    per tile: a few 1e-6 rad after hundreds of tiles, against the ~1e-3 rad of fp32 t * theta itself.
    """
    return (cos * step_cos[None, :] - sin * step_sin[None, :],
            sin * step_cos[None, :] + cos * step_sin[None, :])


@triton.jit
def _cartesian(mu, cos, sin, DTYPE: tl.constexpr):
    """The Cartesian halves mu cos, mu sin of magnitudes mu (fp32), in DTYPE for the tensor cores."""
    return (mu * cos).to(DTYPE), (mu * sin).to(DTYPE)


@triton.jit
def _polar(x, cos, sin, DTYPE: tl.constexpr):
    """The Cartesian halves of raw rows x (mu = softplus(x)): the stationary side, once per program.

    mu is rounded to DTYPE first, as the streamed side's mu from the prepass is (see the module docstring)."""
    return _cartesian(_softplus(x.to(tl.float32)).to(DTYPE).to(tl.float32), cos, sin, DTYPE)


@triton.jit
def _polar_grad(x, gc, gs, cos, sin):
    """d/dx of the polar map x -> (mu cos, mu sin) given the gradients gc, gs of its halves.

    Also returns the gradient of the phase, gs * mu cos - gc * mu sin (it is d delta for keys).
    """
    x = x.to(tl.float32)
    mu = _softplus(x)
    dx = tl.sigmoid(x) * (cos * gc + sin * gs)
    dphase = mu * (gs * cos - gc * sin)
    return dx, dphase


@triton.jit
def _causal_bounds(start_m, n_k, q_offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range [0, hi) seen by query rows start_m .. start_m+BLOCK_M-1, split at `full`: blocks before it
    are visible to every row and inside n_k (no masking); [full, hi) needs the mask."""
    if CAUSAL:
        first_pos = q_offset + start_m
        hi = tl.minimum(first_pos + BLOCK_M, n_k)
        full = tl.minimum(first_pos + 1, n_k) // BLOCK_N * BLOCK_N
    else:
        hi = n_k
        full = n_k // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _load_rows(base, rows, row_ok, stride, d):
    return tl.load(base + rows[:, None] * stride + d[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit
def _store_rows(base, rows, row_ok, stride, d, value):
    tl.store(base + rows[:, None] * stride + d[None, :], value, mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------
# Elementwise passes over rows: the streamed side's magnitudes; D = rowsum(dO O) for the fused dq; dq's last step


@triton.jit
def _row_block(n_heads, n_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """An elementwise program's place: its (batch x head) index bh = (b, h), its BLOCK rows with their mask, the
    head-dim columns, and the rows' index into a contiguous (B, H, N, ...) tensor."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return bh, bh // n_heads, bh % n_heads, rows, rows < n_rows, tl.arange(0, HEAD_DIM), bh.to(tl.int64) * n_rows + rows


@triton.jit
def _softplus_kernel(X, Mu, stride_xb, stride_xh, stride_xn, n_heads, n_rows,
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Mu = softplus(X) in X's dtype, (B, H, N, D) contiguous.

    The streamed side of every loop reads Mu instead of X: its softplus (two SFU ops per element) is then
    paid once instead of once per stationary block.
    """
    _, b, h, rows, row_ok, d, o_rows = _row_block(n_heads, n_rows, HEAD_DIM, BLOCK)
    x = _load_rows(X + b.to(tl.int64) * stride_xb + h * stride_xh, rows, row_ok, stride_xn, d)
    tl.store(Mu + o_rows[:, None] * HEAD_DIM + d[None, :], _softplus(x.to(tl.float32)).to(x.dtype),
             mask=row_ok[:, None])


@triton.jit
def _dvec_kernel(Out, DO, Dvec, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, n_heads, n_rows,
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Dvec = rowsum(DO * Out) (B, H, N) contiguous, for the fused dq pass (the dq pass computes it otherwise)."""
    _, b, h, rows, row_ok, d, o_rows = _row_block(n_heads, n_rows, HEAD_DIM, BLOCK)
    out = _load_rows(Out + b.to(tl.int64) * stride_ob + h * stride_oh, rows, row_ok, stride_on, d)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h * stride_doh, rows, row_ok, stride_don, d)
    tl.store(Dvec + o_rows, tl.sum(out.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _dq_finish_kernel(Q, DQacc, DQ, stride_qb, stride_qh, stride_qn, stride_gb, stride_gh, stride_gn, n_heads, n_rows,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """dq = sigmoid(q) ln2 U from the fp32 sum U of cos(t theta) (dS kc) + sin(t theta) (dS ks) over key
    blocks (the query phases carry sm_scale log2(e); ln2 leaves sm_scale)."""
    bh, b, h, rows, row_ok, d, _ = _row_block(n_heads, n_rows, HEAD_DIM, BLOCK)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, rows, row_ok, stride_qn, d)
    acc = _load_rows(DQacc + bh.to(tl.int64) * n_rows * HEAD_DIM, rows, row_ok, HEAD_DIM, d)
    dq = tl.sigmoid(q.to(tl.float32)) * acc * _LN2
    _store_rows(DQ + b.to(tl.int64) * stride_gb + h * stride_gh, rows, row_ok, stride_gn, d, dq.to(q.dtype))


# ---------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _key_tile_scores(qc, qs, mu_base, v_base, stride_vn, cols, col_ok, d, cos, sin,
                     HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Load one key/value tile (the keys as their magnitudes mu_k, contiguous rows), turn the keys into their
    Cartesian halves at phases (cos, sin), and score the query tile against them: S = qc kc^T + qs ks^T, the
    2D-wide product as two D-wide ones."""
    mu = _load_rows(mu_base, cols, col_ok, HEAD_DIM, d)
    v = _load_rows(v_base, cols, col_ok, stride_vn, d)
    kc, ks = _cartesian(mu.to(tl.float32), cos, sin, v.dtype)
    s = tl.dot(qc, tl.trans(kc), input_precision=DOT_PRECISION)
    s = tl.dot(qs, tl.trans(ks), s, input_precision=DOT_PRECISION)
    return s, kc, ks, v


@triton.jit
def _query_block(Q, Freqs, Delta, stride_qb, stride_qh, stride_qn, n_heads, n_q, q_offset, qk_scale,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query-stationary program's block: where it is, the head's frequencies and phase biases, its raw queries,
    and those in Cartesian form with sm_scale * log2(e) folded in (scores come out in log2 units, ready for exp2)."""
    # Causal: the last query blocks see the most keys; launch them first so the short ones fill the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    d = tl.arange(0, HEAD_DIM)
    freqs = tl.load(Freqs + d)
    delta = tl.load(Delta + h * HEAD_DIM + d)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, rows, row_ok, stride_qn, d)
    cos, sin = _phases(q_offset + start_m, BLOCK_M, freqs, tl.zeros([HEAD_DIM], tl.float32))
    qc, qs = _polar(q, cos * qk_scale, sin * qk_scale, q.dtype)
    return bh, b, h, start_m, rows, row_ok, d, freqs, delta, q_offset + rows, q, qc, qs


@triton.jit
def _causal_keep(cols, col_ok, q_pos, CAUSAL: tl.constexpr):
    """Which (query, key) pairs of a tile count: keys inside the sequence and, if causal, not after the query."""
    keep = col_ok[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= q_pos[:, None])
    return keep


@triton.jit
def _fwd_inner(acc, m_i, l_i, qc, qs, mu_base, v_base, stride_vn, freqs, delta, q_pos, lo, hi, n_k,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    cos, sin = _phases(lo, BLOCK_N, freqs, delta)  # key phases s theta + delta of the first tile
    step_cos, step_sin = _cos_sin(BLOCK_N * freqs)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        s, _, _, v = _key_tile_scores(qc, qs, mu_base, v_base, stride_vn, cols, col_ok, d, cos, sin,
                                      HEAD_DIM, DOT_PRECISION)
        cos, sin = _rotate(cos, sin, step_cos, step_sin)
        if MASKED:
            s = tl.where(_causal_keep(cols, col_ok, q_pos, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, MuK, V, Freqs, Delta, Out, Lse,
                stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                n_heads, n_q, n_k, q_offset, qk_scale,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    bh, b, h, start_m, rows, row_ok, d, freqs, delta, q_pos, q, qc, qs = _query_block(
        Q, Freqs, Delta, stride_qb, stride_qh, stride_qn, n_heads, n_q, q_offset, qk_scale, CAUSAL, HEAD_DIM, BLOCK_M)
    dtype = q.dtype

    mu_base = MuK + bh.to(tl.int64) * n_k * HEAD_DIM
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    full, hi = _causal_bounds(start_m, n_k, q_offset, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, qc, qs, mu_base, v_base, stride_vn, freqs, delta,
                               q_pos, 0, full, n_k, CAUSAL, False, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, qc, qs, mu_base, v_base, stride_vn, freqs, delta,
                               q_pos, full, hi, n_k, CAUSAL, True, BLOCK_N, HEAD_DIM, DOT_PRECISION)

    out = acc / l_i[:, None]
    _store_rows(Out + b.to(tl.int64) * stride_ob + h * stride_oh, rows, row_ok, stride_on, d, out.to(dtype))
    tl.store(Lse + bh.to(tl.int64) * n_q + rows, m_i + tl.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Backward: dq pass (queries stationary); skipped where uses_fused_dq


@triton.jit
def _dq_inner(gc, gs, qc, qs, do, lse, dvec, mu_base, v_base, stride_vn, freqs, delta, q_pos,
              lo, hi, n_k,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    cos, sin = _phases(lo, BLOCK_N, freqs, delta)  # key phases s theta + delta of the first tile
    step_cos, step_sin = _cos_sin(BLOCK_N * freqs)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        s, kc, ks, v = _key_tile_scores(qc, qs, mu_base, v_base, stride_vn, cols, col_ok, d, cos, sin,
                                        HEAD_DIM, DOT_PRECISION)
        cos, sin = _rotate(cos, sin, step_cos, step_sin)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_causal_keep(cols, col_ok, q_pos, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - dvec[:, None])).to(v.dtype)
        gc = tl.dot(ds, kc, gc, input_precision=DOT_PRECISION)
        gs = tl.dot(ds, ks, gs, input_precision=DOT_PRECISION)
    return gc, gs


@triton.jit
def _dq_kernel(Q, MuK, V, Freqs, Delta, Out, DO, Lse, Dvec, DQ,
               stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn,
               stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
               stride_gb, stride_gh, stride_gn,
               n_heads, n_q, n_k, q_offset, sm_scale, qk_scale,
               CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    bh, b, h, start_m, rows, row_ok, d, freqs, delta, q_pos, q, qc, qs = _query_block(
        Q, Freqs, Delta, stride_qb, stride_qh, stride_qn, n_heads, n_q, q_offset, qk_scale, CAUSAL, HEAD_DIM, BLOCK_M)
    dtype = q.dtype
    o_rows = bh.to(tl.int64) * n_q + rows

    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h * stride_doh, rows, row_ok, stride_don, d)
    out = _load_rows(Out + b.to(tl.int64) * stride_ob + h * stride_oh, rows, row_ok, stride_on, d)
    dvec = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(Dvec + o_rows, dvec, mask=row_ok)  # for the dk/dv pass, which runs next
    lse = tl.load(Lse + o_rows, mask=row_ok, other=float("inf"))  # padded rows: P = 0

    mu_base = MuK + bh.to(tl.int64) * n_k * HEAD_DIM
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    gc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    gs = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _causal_bounds(start_m, n_k, q_offset, CAUSAL, BLOCK_M, BLOCK_N)
    gc, gs = _dq_inner(gc, gs, qc, qs, do, lse, dvec, mu_base, v_base, stride_vn, freqs, delta,
                       q_pos, 0, full, n_k, CAUSAL, False, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    gc, gs = _dq_inner(gc, gs, qc, qs, do, lse, dvec, mu_base, v_base, stride_vn, freqs, delta,
                       q_pos, full, hi, n_k, CAUSAL, True, BLOCK_N, HEAD_DIM, DOT_PRECISION)

    # the phases again rather than kept live through the loop (registers are the scarce resource here)
    cos, sin = _phases(q_offset + start_m, BLOCK_M, freqs, tl.zeros([HEAD_DIM], tl.float32))
    dq, _ = _polar_grad(q, gc * sm_scale, gs * sm_scale, cos, sin)
    _store_rows(DQ + b.to(tl.int64) * stride_gb + h * stride_gh, rows, row_ok, stride_gn, d, dq.to(dtype))


# ---------------------------------------------------------------------------------------------------------
# Backward: dk, dv and d delta pass (keys stationary); with FUSED_DQ also dq, by atomics


@triton.jit
def _dkdv_inner(dv, gc, gs, kc, ks, v, muq_base, do_base, stride_don, lse_base, dvec_base, dq_base, freqs,
                cols, col_ok, lo, hi, n_q, q_offset, qk_scale,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    cos, sin = _phases(q_offset + lo, BLOCK_M, freqs, tl.zeros([HEAD_DIM], tl.float32))  # t theta
    # sm_scale log2(e) on the query side, as in the forward (angle addition keeps the factor)
    cos, sin = cos * qk_scale, sin * qk_scale
    step_cos, step_sin = _cos_sin(BLOCK_M * freqs)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < n_q
        mu = _load_rows(muq_base, rows, row_ok, HEAD_DIM, d)
        do = _load_rows(do_base, rows, row_ok, stride_don, d)
        # padded query rows get lse = +inf, hence P = 0: they add nothing to dv, gc, gs (nor to dq)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        dvec = tl.load(dvec_base + rows, mask=row_ok, other=0.0)
        qc, qs = _cartesian(mu.to(tl.float32), cos, sin, v.dtype)
        st = tl.dot(kc, tl.trans(qc), input_precision=DOT_PRECISION)
        st = tl.dot(ks, tl.trans(qs), st, input_precision=DOT_PRECISION)
        pt = tl.exp2(st - lse[None, :])
        if MASKED:
            keep = col_ok[:, None]
            if CAUSAL:
                keep = keep & (cols[:, None] <= (q_offset + rows)[None, :])
            pt = tl.where(keep, pt, 0.0)
        dv = tl.dot(pt.to(v.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = (pt * (dpt - dvec[None, :])).to(v.dtype)
        gc = tl.dot(dst, qc, gc, input_precision=DOT_PRECISION)
        gs = tl.dot(dst, qs, gs, input_precision=DOT_PRECISION)
        if FUSED_DQ:
            # this key block's share of dq, rotated back by the query phases and summed over key blocks
            # in fp32 (sigmoid(q) is the same for every block: applied once, by _dq_finish_kernel)
            ds = tl.trans(dst)
            u = cos * tl.dot(ds, kc, input_precision=DOT_PRECISION)
            u += sin * tl.dot(ds, ks, input_precision=DOT_PRECISION)
            tl.atomic_add(dq_base + rows[:, None] * HEAD_DIM + d[None, :], u, mask=row_ok[:, None],
                          sem="relaxed")
        cos, sin = _rotate(cos, sin, step_cos, step_sin)
    return dv, gc, gs


@triton.jit
def _dkdv_kernel(MuQ, K, V, Freqs, Delta, DO, Lse, Dvec, DK, DV, DDelta, DQacc,
                 stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_don, stride_gb, stride_gh, stride_gn,
                 n_heads, n_q, n_k, q_offset, qk_scale,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 FUSED_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)  # causal: the first key blocks are seen by the most queries, launched first
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < n_k
    d = tl.arange(0, HEAD_DIM)
    freqs = tl.load(Freqs + d)
    delta = tl.load(Delta + h * HEAD_DIM + d)

    k = _load_rows(K + b.to(tl.int64) * stride_kb + h * stride_kh, cols, col_ok, stride_kn, d)
    v = _load_rows(V + b.to(tl.int64) * stride_vb + h * stride_vh, cols, col_ok, stride_vn, d)
    dtype = v.dtype
    cos, sin = _phases(start_n, BLOCK_N, freqs, delta)
    kc, ks = _polar(k, cos, sin, dtype)

    # Query tiles that see this key block: [lo, full) need the mask, [full, n_q) see all of it. The mask is for
    # the tiles that straddle the causal diagonal, and for every tile of a block with padded keys (the last one,
    # where n_k % BLOCK_N != 0): unmasked, a padded key's P = exp2(0 - lse) overflows to inf where lse < -128,
    # and inf * (kc = 0) is NaN in the fused dq.
    if CAUSAL:
        lo = tl.maximum(start_n - q_offset, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M, n_q)
    else:
        lo = 0
        full = 0
    full = tl.where(start_n + BLOCK_N > n_k, n_q, full)
    q_rows = bh.to(tl.int64) * n_q
    muq_base = MuQ + q_rows * HEAD_DIM
    dq_base = DQacc + q_rows * HEAD_DIM
    do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    gc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    gs = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv, gc, gs = _dkdv_inner(dv, gc, gs, kc, ks, v, muq_base, do_base, stride_don, Lse + q_rows, Dvec + q_rows,
                             dq_base, freqs, cols, col_ok, lo, full, n_q, q_offset, qk_scale, CAUSAL, True, FUSED_DQ,
                             BLOCK_M, HEAD_DIM, DOT_PRECISION)
    dv, gc, gs = _dkdv_inner(dv, gc, gs, kc, ks, v, muq_base, do_base, stride_don, Lse + q_rows, Dvec + q_rows,
                             dq_base, freqs, cols, col_ok, full, n_q, n_q, q_offset, qk_scale, CAUSAL, False,
                             FUSED_DQ, BLOCK_M, HEAD_DIM, DOT_PRECISION)

    cos, sin = _phases(start_n, BLOCK_N, freqs, delta)  # again, rather than kept live through the loop
    # gc, gs carry the queries' sm_scale log2(e); ln2 leaves sm_scale
    dk, ddelta = _polar_grad(k, gc * _LN2, gs * _LN2, cos, sin)
    grad_base = b.to(tl.int64) * stride_gb + h * stride_gh  # dk and dv share their strides
    _store_rows(DK + grad_base, cols, col_ok, stride_gn, d, dk.to(dtype))
    _store_rows(DV + grad_base, cols, col_ok, stride_gn, d, dv.to(dtype))
    ddelta = tl.sum(tl.where(col_ok[:, None], ddelta, 0.0), 0)
    tl.atomic_add(DDelta + h * HEAD_DIM + d, ddelta, sem="relaxed")


# ---------------------------------------------------------------------------------------------------------
# Launchers: autotuned on GPU, one fixed small configuration under the interpreter


# Where the backward adds dq by fp32 atomics inside the dk/dv pass (8 matmul units) instead of running the separate
# dq pass (11 units). On the H100 with triton 3.6 the fused pass spills 120-560 bytes of registers per thread and
# lost at every measured shape with N >= 2048 or D = 128; it won at the launch-bound N = 1024, D = 64 in version 2
# (attention_results.md), but no longer: in session 11 (attention_notes.md) the split backward took 0.537 ms of
# GPU time for fwd+bwd at (8, 12, 1024, 64) with every kernel in Triton and 0.493 with the Gluon forward and dq
# pass, against 0.562 fused (with the Gluon forward). So no head dim uses it by default; benchmarks/attention.py
# widens both knobs for its "ours fused-dq (A/B)" case, to re-check when Triton or the tiles change.
FUSED_DQ_HEAD_DIMS: frozenset[int] = frozenset()
FUSED_DQ_MAX_KEYS = 1024


def uses_fused_dq(head_dim: int, n_k: int) -> bool:
    return head_dim in FUSED_DQ_HEAD_DIMS and n_k <= FUSED_DQ_MAX_KEYS

# Autotuning candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim (32 uses 64's); M counts
# queries, N keys, whichever side is streamed. v1's lists were kept to those whose inner loop compiles for
# sm_90 without (or with few) register spills and that won on the H100 (benchmarks/attention_notes.md);
# "dkdv_dq" is the fused pass (two more products and an fp32 tile of atomics per step; all spill). The 64-row,
# 4-warp tiles of fwd and dq fit two CTAs per SM (one warpgroup each, no barrier between them), which beat one
# 8-warp CTA of 128 rows by 4-7% at D = 64 (version 3 in the notes); the dk/dv pass spills at 4 warps and lost.
_BLOCKS = {
    "fwd": {64: [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2)],
            128: [(128, 32, 8, 2), (128, 64, 8, 2)]},
    "dq": {64: [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)], 128: [(128, 32, 8, 2), (64, 64, 8, 2)]},
    "dkdv": {64: [(64, 128, 8, 2), (32, 128, 8, 2)], 128: [(32, 64, 8, 2), (64, 64, 8, 2)]},
    "dkdv_dq": {64: [(64, 128, 8, 2), (32, 128, 8, 2), (16, 128, 8, 2)], 128: [(32, 64, 8, 2), (16, 64, 4, 2)]},
}
# fp32 inputs (products in full fp32, DOT_PRECISION "ieee") hold twice the bytes per tile in registers: the tiles
# above spill 7-27 KB a thread there and ran 8-12x slower than the ones below, and CUDA reserves the largest spill
# of any launched kernel, autotuning candidates included, for every thread of the card (27 KB: 6.9 GiB on an H100)
# for the rest of the process. Measured on the H100 with benchmarks/attention_tiles.py at (2, 12, 1024, 64) and
# (1, 8, 1024, 128), session 24: fwd at D = 64 724 us with no spill against 8-9 ms for the bf16 tiles; each row here
# was the fastest tile without, or with under 1 KB of, spill. The dk/dv pass at D = 128 was not measured: its tile
# follows the forward's there (8 warps, no spill at 32 x 32).
_FP32_BLOCKS = {
    "fwd": {64: [(32, 32, 4, 1)], 128: [(32, 32, 8, 1)]},
    "dq": {64: [(32, 32, 4, 1)], 128: [(16, 32, 4, 1)]},
    "dkdv": {64: [(32, 32, 4, 1)], 128: [(32, 32, 8, 1)]},
    "dkdv_dq": {64: [(32, 32, 4, 1)], 128: [(32, 32, 8, 1)]},
}


def _zero_accumulators(nargs: dict) -> None:
    # d delta and the fused dq are accumulated with atomics: every autotuning trial and the final run must
    # start from zero
    nargs["DDelta"].zero_()
    nargs["DQacc"].zero_()


def _autotune(kernel, name: str, pre_hook=None):
    def for_head_dim(configs, named_args, **kwargs):
        table = _FP32_BLOCKS if kwargs["DOT_PRECISION"] == "ieee" else _BLOCKS
        wanted = table["dkdv_dq" if kwargs.get("FUSED_DQ") else name][max(64, kwargs["HEAD_DIM"])]
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    names = [name, "dkdv_dq"] if name == "dkdv" else [name]
    candidates = dict.fromkeys(b for table in (_BLOCKS, _FP32_BLOCKS) for n in names for bs in table[n].values()
                               for b in bs)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=pre_hook)
               for m, n, w, s in candidates]
    key = ["n_q", "n_k", "HEAD_DIM", "CAUSAL"] + (["FUSED_DQ"] if name == "dkdv" else [])
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": for_head_dim})(kernel)


_fwd_tuned = _autotune(_fwd_kernel, "fwd")
_dq_tuned = _autotune(_dq_kernel, "dq")
_dkdv_tuned = _autotune(_dkdv_kernel, "dkdv", _zero_accumulators)
_INTERPRETER_BLOCKS = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)}
_ROW_BLOCK = 16 if _INTERPRETED else 64  # rows per program of the elementwise passes


def _launch(name: str, tuned, kernel, grid_rows: int, bh: int, *args, **constexprs) -> None:
    """Run `kernel` over (row blocks, batch * heads) programs; rows are queries (fwd, dq) or keys (dkdv)."""
    if _INTERPRETED:
        block_m, block_n = _INTERPRETER_BLOCKS[name]
        block = block_n if name == "dkdv" else block_m
        kernel[(triton.cdiv(grid_rows, block), bh)](*args, **constexprs, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        meta_block = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
        tuned[lambda meta: (triton.cdiv(grid_rows, meta[meta_block]), bh)](*args, **constexprs)


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) in x's dtype, (B, H, N, D) contiguous."""
    batch, heads, n, head_dim = x.shape
    mu = torch.empty((batch, heads, n, head_dim), device=x.device, dtype=x.dtype)
    _softplus_kernel[(triton.cdiv(n, _ROW_BLOCK), batch * heads)](
        x, mu, *_row_strides(x), heads, n, HEAD_DIM=head_dim, BLOCK=_ROW_BLOCK)
    return mu


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """The attention output (B, H, Nq, D), laid out as (B, Nq, H, D) in memory: the model's transpose to (B, Nq, H * D)
    for the output projection is then a view, not a copy (SDPA's output is laid out so too)."""
    batch, heads, n_q, head_dim = q.shape
    return q.new_empty((batch, n_q, heads, head_dim)).transpose(1, 2)


def _row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # the kernels read rows as contiguous vectors; anything else (an expanded gradient, say) is copied
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products (tf32 would cost 1e-3 relative error); ignored for fp16/bf16
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, delta, freqs, causal, sm_scale, q_offset):
    if not q.is_cuda and not _INTERPRETED:
        raise RuntimeError("pope_attention runs Triton kernels on CUDA tensors; on CPU use "
                           "pope_attention_reference (or run the kernels slowly in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before the process first imports triton)")
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    out = _empty_output(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    mu_k = _magnitudes(k)  # the streamed keys' softplus, once
    qk_scale = sm_scale * math.log2(math.e)
    if _on_hopper("fwd", q, causal):
        flash_hopper.forward(q, mu_k, v, freqs, delta.contiguous(), out, lse, causal, qk_scale, q_offset)
    else:
        _launch("fwd", _fwd_tuned, _fwd_kernel, n_q, batch * heads,
                q, mu_k, v, freqs, delta.contiguous(), out, lse,
                *_row_strides(q), *_row_strides(v), *_row_strides(out),
                heads, n_q, n_k, q_offset, qk_scale,
                CAUSAL=causal, HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype))
    return out, lse


def _backward(dout, q, k, v, delta, freqs, out, lse, causal, sm_scale, q_offset, dq, dk, dv):
    """Writes the gradients of q, k, v into dq, dk, dv (unit last stride; dk and dv with the same strides) and returns
    delta's."""
    dout, q, k, v = (_unit_last_stride(x) for x in (dout, q, k, v))
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    bh = batch * heads
    delta = delta.contiguous()
    qk_scale = sm_scale * math.log2(math.e)
    split = not uses_fused_dq(head_dim, n_k)
    constexprs = dict(CAUSAL=causal, HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype))
    dvec = torch.empty_like(lse)  # D = rowsum(dO * O)
    ddelta = torch.zeros((heads, head_dim), device=q.device, dtype=torch.float32)
    mu_q = _magnitudes(q)  # the streamed queries' softplus for the dk/dv pass
    if split:
        # the streamed keys' softplus for the dq pass, again (the backward keeps only q, k, v, out and lse, as
        # FlashAttention-2 does); the Hopper passes also build their stationary rows from mu_q and mu_k (no softplus in
        # their prologues). The dq pass writes D for the dk/dv pass, which runs after it.
        mu_k = _magnitudes(k)
        if _on_hopper("dq", q, causal):
            flash_hopper.dq_pass(q, mu_q, mu_k, v, freqs, delta, out, dout, lse, dvec, dq, causal, sm_scale,
                                 q_offset)
        else:
            _launch("dq", _dq_tuned, _dq_kernel, n_q, bh,
                    q, mu_k, v, freqs, delta, out, dout, lse, dvec, dq,
                    *_row_strides(q), *_row_strides(v), *_row_strides(out), *_row_strides(dout), *_row_strides(dq),
                    heads, n_q, n_k, q_offset, sm_scale, qk_scale, **constexprs)
        dq_acc = ddelta.new_zeros(1)  # unused
    else:
        _dvec_kernel[(triton.cdiv(n_q, _ROW_BLOCK), bh)](
            out, dout, dvec, *_row_strides(out), *_row_strides(dout), heads, n_q, HEAD_DIM=head_dim, BLOCK=_ROW_BLOCK)
        dq_acc = torch.zeros((batch, heads, n_q, head_dim), device=q.device, dtype=torch.float32)
    if split and _on_hopper("dkdv", q, causal):
        flash_hopper.dkdv_pass(mu_q, mu_k, k, v, freqs, delta, dout, lse, dvec, dk, dv, ddelta, causal, qk_scale,
                               q_offset)
    else:
        _launch("dkdv", _dkdv_tuned, _dkdv_kernel, n_k, bh,
                mu_q, k, v, freqs, delta, dout, lse, dvec, dk, dv, ddelta, dq_acc,
                *_row_strides(k), *_row_strides(v), *_row_strides(dout), *_row_strides(dk),
                heads, n_q, n_k, q_offset, qk_scale, FUSED_DQ=not split, **constexprs)
    if not split:
        _dq_finish_kernel[(triton.cdiv(n_q, _ROW_BLOCK), bh)](
            q, dq_acc, dq, *_row_strides(q), *_row_strides(dq), heads, n_q, HEAD_DIM=head_dim, BLOCK=_ROW_BLOCK)
    return ddelta.to(delta.dtype)


# ---------------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (no graph break), differentiable through autograd


# The frequencies theta_c are an input, not a table cached here: under torch.compile their computation is part of
# the graph (one small fused kernel, or a constant), and a cache filled on the first call would be allocated
# inside a CUDA-graph memory pool when that call is being captured (compile mode reduce-overhead) and outlive it.
@torch.library.custom_op("pope_lm::pope_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, freqs: torch.Tensor,
            causal: bool, sm_scale: float, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, delta, freqs, causal, sm_scale, q_offset)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, delta, freqs, causal, sm_scale, q_offset):
    return _empty_output(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("pope_lm::pope_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor,
            freqs: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: bool, sm_scale: float,
            q_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    ddelta = _backward(dout, q, k, v, delta, freqs, out, lse, causal, sm_scale, q_offset, dq, dk, dv)
    return dq, dk, dv, ddelta


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, delta, freqs, out, lse, causal, sm_scale, q_offset):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), delta.new_empty(delta.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, delta, freqs, ctx.causal, ctx.sm_scale, ctx.q_offset = inputs
    ctx.save_for_backward(q, k, v, delta, freqs, *output)


def _autograd_backward(ctx, dout, _dlse):
    grads = _bwd_op(dout, *ctx.saved_tensors, ctx.causal, ctx.sm_scale, ctx.q_offset)
    return *grads, None, None, None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# The same for self-attention on the model's packed projection qkv (B, N, 3, H, D): the backward writes dq, dk, dv
# straight into one dqkv of that layout, the gradient of the projection's output, where the unpacked op's three
# gradients would be stacked into it by a copy (a read and a write of 3 (B, H, N, D) tensors per layer).
@torch.library.custom_op("pope_lm::pope_attention_packed_fwd", mutates_args=())
def _packed_fwd_op(qkv: torch.Tensor, delta: torch.Tensor, freqs: torch.Tensor, causal: bool,
                   sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(*split_qkv(qkv), delta, freqs, causal, sm_scale, 0)


@_packed_fwd_op.register_fake
def _packed_fwd_fake(qkv, delta, freqs, causal, sm_scale):
    q = split_qkv(qkv)[0]
    return _empty_output(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("pope_lm::pope_attention_packed_bwd", mutates_args=())
def _packed_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, delta: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    ddelta = _backward(dout, *split_qkv(qkv), delta, freqs, out, lse, causal, sm_scale, 0, *split_qkv(dqkv))
    return dqkv, ddelta


@_packed_bwd_op.register_fake
def _packed_bwd_fake(dout, qkv, delta, freqs, out, lse, causal, sm_scale):
    return qkv.new_empty(qkv.shape), delta.new_empty(delta.shape)


def _packed_setup_context(ctx, inputs, output) -> None:
    qkv, delta, freqs, ctx.causal, ctx.sm_scale = inputs
    ctx.save_for_backward(qkv, delta, freqs, *output)


def _packed_autograd_backward(ctx, dout, _dlse):
    return *_packed_bwd_op(dout, *ctx.saved_tensors, ctx.causal, ctx.sm_scale), None, None, None


_packed_fwd_op.register_autograd(_packed_autograd_backward, setup_context=_packed_setup_context)


def _checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, sm_scale: float | None,
             theta: float, q_offset: int) -> tuple[float, torch.Tensor]:
    """Raises on what the kernels do not take; returns the softmax scale and the frequencies theta_c."""
    _check_shapes(q, k, v, delta)
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"pope_attention supports head dims {HEAD_DIMS}; got {head_dim}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_offset < 0 or k.shape[2] == 0:
        raise ValueError(f"need q_offset >= 0 and at least one key; got {q_offset}, {k.shape[2]} keys")
    return softmax_scale(head_dim, sm_scale), pope_frequencies(head_dim, float(theta), q.device, torch.float32)


def pope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, *,
                   causal: bool = True, sm_scale: float | None = None, theta: float = 10000.0,
                   q_offset: int = 0) -> torch.Tensor:
    """PoPE attention with the fused Triton kernels; same function as `pope_attention_reference`.

    q: (B, H, Nq, D), k and v: (B, H, Nk, D), fp16/bf16/fp32, D in {32, 64, 128}; delta: (H, D), used as
    given (the module clamps it). Query row i sits at position q_offset + i, key row j at j; causal masks
    keys j > q_offset + i. Returns (B, H, Nq, D) in q's dtype, differentiable in q, k, v and delta.
    Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (slow; for tests).
    """
    sm_scale, freqs = _checked(q, k, v, delta, sm_scale, theta, q_offset)
    out, _ = _fwd_op(q, k, v, delta.float(), freqs, causal, sm_scale, int(q_offset))
    return out


def pope_attention_packed(qkv: torch.Tensor, delta: torch.Tensor, *, causal: bool = True,
                          sm_scale: float | None = None, theta: float = 10000.0) -> torch.Tensor:
    """`pope_attention` of q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2] (each (B, N, H, D), as (B, H, N, D)) for
    the projection qkv (B, N, 3, H, D) of self-attention: the gradient comes back as one (B, N, 3, H, D) tensor, the
    projection's own layout, with no copy to assemble it."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D); got {tuple(qkv.shape)}")
    q, k, v = split_qkv(qkv)
    sm_scale, freqs = _checked(q, k, v, delta, sm_scale, theta, 0)
    out, _ = _packed_fwd_op(qkv, delta.float(), freqs, causal, sm_scale)
    return out
