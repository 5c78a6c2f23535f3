"""PoPE attention on Hopper (sm_90) in Gluon: a producer warpgroup builds the streamed tiles.

Same contract and arithmetic as flash.py's kernels (see its docstring for the math); only the schedule differs. In
the Triton kernels the warps that run the softmax and the tensor-core products also build every streamed tile's
Cartesian halves (load mu, multiply by the phases, convert, store to shared memory, barrier, advance the phases):
measured, 40% of the forward's time (benchmarks/attention_notes.md, session 10). Here each program runs three
warpgroups (warp specialization): a producer fills a ring of shared-memory stages and signals each one ready
(mbarrier); two consumers, 64 stationary rows each, use a stage on the tensor cores and release it (a named barrier
in the forward and dq pass, an mbarrier in the dk/dv pass; the producer refills a stage once both consumers released
it). The backward passes build their stationary rows from the pre-passes' magnitudes (mu_q, mu_k), not by a softplus.

    forward   keys streamed: the producer builds kc = mu_k cos, ks = mu_k sin and copies V by cp.async; each
              consumer holds 64 queries: S = qc kc^T + qs ks^T, online softmax, O += P V.
    dq pass   the same producer; consumers: S, dP = dO V^T, dS = P (dP - D), gc += dS kc, gs += dS ks; then dq. At
              D = 128 both consumers hold the same 64 queries, each with half the channels of gc and gs (_dq_rows).
    dk/dv     queries streamed: the producer copies dO into the stage and mu_q into shared memory by cp.async,
              builds qc, qs from mu_q (phases by angle addition at D <= 64, computed directly at D = 128:
              _query_producer), and stages -lse, -D as folded rows (_folded); each consumer holds 64 keys:
              S^T - lse and dP^T - D (both from the tensor cores), dV += P^T dO, gc += dS^T qc, gs += dS^T qs;
              then dk, dv and d delta. At D = 128, where dV, gc and gs of 64 keys would take 192 registers a
              thread, both consumers hold the same 64 keys and each accumulates half the channels; the first
              computes S^T and dS^T, the second dP^T, and they hand them over in shared memory (_dkdv_tile_shared).

The producer's work then runs beside the consumers' instead of before it, and one build serves 128 stationary rows
(64 in the backward passes at D = 128).
The forward and the dq pass are persistent: one program per SM loops over blocks of 128 query rows, and its ring
runs on from one block to the next, so the next block's first tiles are built while the consumers finish the last.
Which blocks each program takes (_work) balances the causal lengths and, where all heads' keys outgrow L2, keeps few
heads in flight.
Triton's own warp specialization does not split these loops on Hopper (the streamed tiles are built in registers,
not loaded by TMA), hence Gluon, Triton's lower-level dialect with explicit layouts, shared memory and mbarriers.

Gluon kernels do not run in Triton's interpreter: on the CPU (CI) the tests compile these kernels for sm_90a and check
their registers; their numbers are checked on the GPU by benchmarks/attention.py. flash.py calls them where `handles`
says so and keeps the Triton kernels for every other case (other GPUs, fp32, head dims not listed in CONFIGS).
"""

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from . import work_order

# triton 3.6 calls the barrier of a warp group's threads thread_barrier, 3.7 and later barrier
_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
# cp.async from global to shared memory: async_copy_global_to_shared in triton 3.6, async_load later
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

_TWO_PI_HI = gl.constexpr(6.28125)  # Cody-Waite split of 2 pi, as in flash.py
_TWO_PI_LO = gl.constexpr(2 * math.pi - 6.28125)
_INV_TWO_PI = gl.constexpr(1 / (2 * math.pi))
_LN2 = gl.constexpr(math.log(2))
_LOG2E = gl.constexpr(math.log2(math.e))

# query rows per work item (forward, dq pass): two consumer warpgroups of 64 (one wgmma M each); half that where the
# consumers split the channels (channel_parts)
BLOCK_M = 128


# Register layouts. Tiles of 64 rows move through registers in _BLOCKED (8 contiguous elements, 16 bytes, per thread
# along a row); a warpgroup's wgmma results and register operands have the tensor cores' own layouts.
_BLOCKED = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))


@gluon.constexpr_function
def _wgmma_layout(n):
    """The layout of one warpgroup's (64, n) wgmma result."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _operand_layout(n):
    """The layout of a register A operand (64, K) of a wgmma whose result is (64, n)."""
    return gl.DotOperandLayout(operand_index=0, parent=_wgmma_layout(n), k_width=2)


@dataclass(frozen=True)
class Config:
    """Per pass and head dim: rows per streamed tile (keys in the forward and dq pass, queries in the dk/dv pass),
    ring stages, and the registers per thread of each consumer and of the producer (3 warpgroups of 128 threads
    share the SM's 64K; the key producer holds the phases of the rows it builds at once, 2 x build_rows x D fp32,
    build_rows = block_n unless set; the query producer computes them). causal_only: a configuration that spills for
    non-causal attention, left to flash.py's kernel there. masked_apart (dk/dv pass): the tiles that need the causal
    mask run in a loop of their own, the others without it. persistent (forward, dq pass): one program per SM, each
    looping over work items, instead of one program per item. fp16_regs: (consumer, producer) registers for fp16
    inputs where the split above spills there. staged_mu (forward, dq pass): the key producer copies each tile's mu_k
    by cp.async into a staging buffer one tile ahead and reads it there, instead of loading it into registers
    (_producer)."""
    block_n: int
    stages: int
    consumer_regs: int
    producer_regs: int
    causal_only: bool = False
    masked_apart: bool = False
    build_rows: int = 0
    persistent: bool = False
    fp16_regs: tuple[int, int] | None = None
    staged_mu: bool = False


# By pass and head dim. Measured on an H100 (benchmarks/attention_notes.md, sessions 11 and 19-20);
# tests/test_flash_hopper.py checks that each compiles without spills, which depends on Triton's version (ptxas's
# too): these compile clean with triton 3.9 (CI's). With triton 3.6 (the GPU image's) the dq pass spills a few
# local-memory instructions at D = 64 outside causal bf16 (4 to 18: non-causal, fp16), and 46 to 83 at D = 128; the
# forward is clean (sessions 34 and 35).
CONFIGS = {
    ("fwd", 32): Config(block_n=64, stages=2, consumer_regs=168, producer_regs=168, persistent=True),
    ("fwd", 64): Config(block_n=64, stages=2, consumer_regs=176, producer_regs=152, persistent=True,
                        fp16_regs=(168, 168)),
    # D = 128: forward -30% at (4, 16, 2048) and -31% at (1, 16, 8192) against flash.py's, fwd+bwd -6%; at 192/128
    # registers the forward took 9% longer (attention_notes.md, session 31); the producer's 144 spilled (triton 3.9,
    # non-causal fp16) once it copied V by cp.async, 136 does not (session 34); mu_k staged: the forward -5% to -7%
    # (session 35)
    ("fwd", 128): Config(block_n=64, stages=2, consumer_regs=184, producer_regs=136, persistent=True, build_rows=16,
                         staged_mu=True),
    ("dq", 32): Config(block_n=64, stages=2, consumer_regs=168, producer_regs=168, persistent=True),
    ("dq", 64): Config(block_n=64, stages=2, consumer_regs=176, producer_regs=152, persistent=True,
                       fp16_regs=(168, 168)),
    # D = 128, the consumers splitting the channels (_dq_rows): fwd+bwd -7% at (4, 16, 2048) and -2% at (1, 16, 8192)
    # against flash.py's dq pass; mu_k staged: the pass -2% to -4% (session 35). Spill-free under triton 3.9 (fp16:
    # 168/168 spilled in the paired order once mu_k was staged, session 35); under 3.6 it spills 38-88 local-memory
    # instructions at every split tried, 46-83 at these (attention_notes.md, sessions 30, 34 and 35).
    ("dq", 128): Config(block_n=64, stages=2, consumer_regs=176, producer_regs=152, persistent=True, build_rows=16,
                        fp16_regs=(168, 176), staged_mu=True),
    # 64-query tiles, which the folded rows (_folded) make fit: the pass -2% at the pretraining shape to -6% at
    # (1, 12, 10240) at D = 64 against 32-query tiles with lse and D staged in the ring and loaded by the consumers,
    # fwd+bwd -4% and -7% at D = 32 against 32-query tiles whose consumers loaded them from global memory (folded at
    # 32 queries: +7% to +12%); masked_apart: the pass -2% to -4% at D = 64, fwd+bwd +4% at D = 32 (attention_notes.md,
    # sessions 15 and 21)
    ("dkdv", 32): Config(block_n=64, stages=2, consumer_regs=200, producer_regs=112, causal_only=True),
    ("dkdv", 64): Config(block_n=64, stages=2, consumer_regs=200, producer_regs=112, causal_only=True,
                         masked_apart=True),
    # D = 128, the consumers splitting the channels and handing S^T's and dP^T's products between them at 64-query
    # tiles (_dkdv_tile_shared): fwd+bwd -2% at (4, 16, 2048) and -3% at (1, 16, 8192) against each computing the
    # whole S^T and dP^T at 32-query tiles, the same numbers (attention_notes.md, sessions 30 and 31)
    ("dkdv", 128): Config(block_n=64, stages=2, consumer_regs=200, producer_regs=112, causal_only=True,
                          masked_apart=True),
}
# From LONG_KEYS keys on, by pass and head dim: 128-key tiles in the forward (one wait, softmax step and release per
# 128 keys), the producer building them 32 rows at a time (its phase registers), so that each consumer gets 184 (the
# producer's 136 spilled under triton 3.9 once it copied V by cp.async, 128 does not: session 34).
# Forward -4% at (8, 12, 2048), -10% at (1, 12, 10240); +5% at the pretraining shape (16, 12, 1024), where each
# program streams few tiles (+6% there even with the masked half of a consumer's last tile skipped), hence the
# threshold (attention_notes.md, sessions 16 and 17).
LONG_KEYS = 2048
LONG_CONFIGS = {
    ("fwd", 64): Config(block_n=128, stages=2, consumer_regs=184, producer_regs=128, build_rows=32, persistent=True),
}
# The forward and the dq pass take their work in a head-major order (paired or listed: _work, work_order.py) where the
# keys and values of all heads outgrow this share of L2, since the snaking order's programs read every head's keys at
# once. Session 20 (attention_notes.md): snaking lost 2.4-2.6% fwd+bwd at (1, 16, 16384) (64 MiB) against head-major
# programs, and its dq pass 4% at (16, 12, 1024) (48 MiB) against the paired order; at 24-28 MiB the two orders tied.
KEYS_IN_L2 = 0.75
# Of the two head-major orders, the listed one where work_order's cost model has its programs end at least this
# fraction sooner than the paired one's.
LISTED_GAIN = 0.01
_MAXNREG = 168  # 3 warpgroups x 128 threads x 168 = 64,512 of the SM's 65,536 registers


def handles(kernel: str, q: torch.Tensor, causal: bool) -> bool:
    """Whether `kernel` ("fwd", "dq", "dkdv") runs here for q: fp16/bf16 on an sm_90 GPU with a configuration in
    CONFIGS for its head dim (and for non-causal attention, if it is causal only), unless POPE_LM_GLUON=0."""
    config = CONFIGS.get((kernel, q.shape[-1]))  # LONG_CONFIGS' entries run wherever these do
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and config is not None
            and (causal or not config.causal_only) and torch.cuda.get_device_capability(q.device) == (9, 0)
            and os.environ.get("POPE_LM_GLUON", "1") != "0")


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


# ---------------------------------------------------------------------------------------------------------
# The key ring's releases (forward and dq pass): named hardware barriers, one per stage
#
# A consumer releases a stage once its products have read it; the producer refills the stage once both consumers have
# released it. With an mbarrier for this, each release costs the releasing warpgroup a bar.sync (Gluon's
# mbarrier.arrive, triton 3.6 to 3.9, syncs the warpgroup before one thread arrives). On a named barrier each consumer
# warp marks its arrival and goes on (bar.arrive waits for nothing), and the producer's bar.sync returns once all
# 3 x 128 threads have arrived. Triton's own bar.syncs use barriers 0 to 3. Every phase of a barrier must complete
# before the program exits: the producer waits for the last tiles' releases too (_drain), and a consumer releases
# even the tiles it does not read. Measured (attention_notes.md, session 14): the forward -1% and the dq pass -3% at
# the pretraining shape; the dk/dv pass's query ring keeps its mbarriers, since there the same change cost 5% to 12%.
_STAGE_BARRIER = gl.constexpr(8)  # stage s releases on named barrier 8 + s
# where the two consumers of the D = 128 backward passes meet (their channel split: channel_parts): before and after
# staging shared rows, and in the dk/dv pass each tile's dP^T, P^T and dS^T handed between them
_CONSUMERS_BARRIER = gl.constexpr(12)
_DP_READY = gl.constexpr(13)
_DS_READY = gl.constexpr(14)


@gluon.jit
def _release(stage):
    """This warp's release of a ring stage: arrive on its barrier without waiting (the ring's 384 threads count)."""
    gl.inline_asm_elementwise("mov.u32 $0, 0;\n\tbar.arrive $1, 384;", "=r,r", [stage + _STAGE_BARRIER],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _acquire(stage):
    """The producer's wait until both consumers have released a ring stage."""
    gl.inline_asm_elementwise("mov.u32 $0, 0;\n\tbar.sync $1, 384;", "=r,r", [stage + _STAGE_BARRIER],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _drain(n_tiles, STAGES: gl.constexpr):
    """The producer's wait for the releases of its last tiles (those it refilled no stage after)."""
    for t in range(gl.maximum(n_tiles - STAGES, 0), n_tiles):
        _acquire(t % STAGES)


@gluon.jit
def _consumers_sync(barrier):
    """Wait on named barrier `barrier` until both consumer warpgroups (256 threads) have reached or arrived at it."""
    gl.inline_asm_elementwise("mov.u32 $0, 0;\n\tbar.sync $1, 256;", "=r,r", [gl.program_id(0) * 0 + barrier],
                              dtype=gl.int32, is_pure=False, pack=1)  # (an asm operand must be a tensor)


@gluon.jit
def _consumers_arrive(barrier):
    """Arrive at named barrier `barrier` without waiting, for the other consumer's _consumers_sync."""
    gl.inline_asm_elementwise("mov.u32 $0, 0;\n\tbar.arrive $1, 256;", "=r,r", [gl.program_id(0) * 0 + barrier],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _release_unread(ready, first, n_tiles, STAGES: gl.constexpr):
    """A consumer's release of tiles first .. n_tiles-1 without reading them (keys past its rows, causal), each once
    it is ready: released earlier, it could complete the phase of the stage's previous tile for the other consumer."""
    for t in range(first, n_tiles):
        mbarrier.wait(ready.index(t % STAGES), (t // STAGES) & 1)
        _release(t % STAGES)


# ---------------------------------------------------------------------------------------------------------
# What every program shares: its place, the ring of key tiles, the producer


@gluon.jit
def _ring(MuK, V, Freqs, Delta, stride_vb, stride_vh, stride_vn, n_heads, bh_count, n_blocks, n_k, q_offset, Listed,
          listed_rounds, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
          STAGED_MU: gl.constexpr):
    """The program's ring of key tiles: the producer's inputs, the work's extent and order (Listed, listed_rounds: the
    LISTED order's table, _work), the stages and their mbarriers, and with STAGED_MU the producer's two staging slots
    for mu_k (else V's stages stand in, unused)."""
    dtype: gl.constexpr = V.dtype.element_ty
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    kc_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_layout)
    ks_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_layout)
    v_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    mu_s = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_layout) if STAGED_MU else v_s
    return (MuK, V, Freqs, Delta, n_heads, bh_count, n_blocks, n_k, q_offset, stride_vb, stride_vh, stride_vn, kc_s,
            ks_s, v_s, ready, Listed, listed_rounds, mu_s)


_PAIRED = gl.constexpr(work_order.PAIRED)
_LISTED = gl.constexpr(work_order.LISTED)


@gluon.jit
def _units(ring, ORDER: gl.constexpr):
    """How many units of work there are: blocks of query rows (_work) of every batch and head, or in the paired order
    pairs of them."""
    return ring[5] * (gl.cdiv(ring[6], 2) if ORDER == _PAIRED else ring[6])


@gluon.jit
def _rounds(ring, ORDER: gl.constexpr):
    """How many rounds this program loops over, one work item a round (the last ones may be past the work: _work)."""
    if ORDER == _LISTED:
        rounds = ring[17]
    else:
        rounds = (2 if ORDER == _PAIRED else 1) * gl.cdiv(_units(ring, ORDER), gl.num_programs(0))
    return rounds


@gluon.jit
def _work(ring, r, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, ORDER: gl.constexpr, HALVES: gl.constexpr):
    """Round r's work item of this program: whether there is one, its first query row, batch and head, and key tiles.
    An item is a block of 128 query rows, or of 64 where the dq pass's consumers split the channels (HALVES = 2:
    _dq_rows).

    Each program (one per SM, or one per unit of work) takes items in one of three orders (work_order.py says which
    suits which shapes), all evening out the long and short items of causal attention between programs:
    - snaking (work_order.SNAKING): one item a round, block-major, the p-th item in even rounds and the p-th from the
      end in odd ones. Causal: the last query blocks see the most keys and come first, so that the short ones fill
      the tail. The programs of a round read every head's keys: best where all of them stay in L2.
    - _PAIRED: one pair of blocks m and n_blocks - 1 - m of one head every two rounds, the long one first,
      head-major. Each pair costs about the same, and the programs of a round read the keys of a few heads only.
    - _LISTED: round r's entry of this program in the host's table (work_order.choose): bh * n_blocks + m, or -1
      past the program's last item."""
    n_heads, bh_count, n_blocks, n_k, q_offset = ring[4], ring[5], ring[6], ring[7], ring[8]
    g, pid, units = gl.num_programs(0), gl.program_id(0), _units(ring, ORDER)
    if ORDER == _LISTED:
        item = gl.load(ring[16] + r * g + pid)
        valid = item >= 0
        item = gl.maximum(item, 0)  # (past the program's last item: any item, not run)
        m = item % n_blocks
        bh = item // n_blocks
    elif ORDER == _PAIRED:  # unit u: the pair (n_blocks - 1 - j, j) of head u // half
        half = gl.cdiv(n_blocks, 2)
        u = r // 2 * g + pid
        j = u % half
        m = n_blocks - 1 - j + (r % 2) * (2 * j + 1 - n_blocks)  # even rounds n_blocks - 1 - j, odd ones j
        valid = (u < units) & ((r % 2 == 0) | (2 * j + 1 != n_blocks))  # (an odd count's middle: alone)
        bh = u // half
    else:
        w = r * g + pid + (r % 2) * (g - 1 - 2 * pid)
        m = n_blocks - 1 - w // bh_count if CAUSAL else w // bh_count
        valid = w < units
        bh = w % bh_count
    start_m = m * (128 // HALVES)
    n_tiles = gl.cdiv(gl.minimum(q_offset + start_m + 128 // HALVES, n_k) if CAUSAL else n_k, BLOCK_N)
    return valid, start_m, bh // n_heads, bh % n_heads, bh, n_tiles


@gluon.jit
def _producer(ring, CAUSAL: gl.constexpr, ORDER: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, BUILD_ROWS: gl.constexpr, HALVES: gl.constexpr, STAGED_MU: gl.constexpr):
    """The key tiles of the program's work items in order: kc and ks built into the ring's stages BUILD_ROWS rows at a
    time, V copied by cp.async (issued with a tile's first rows, waited for before the tile is signalled ready). The
    ring runs on across items: the next item's first tiles are built while the consumers finish the last one's (their
    epilogue and the next prologue).

    mu_k comes from global memory into registers, BUILD_ROWS rows at a time, or with STAGED_MU by cp.async into a
    staging slot one tile ahead (the first tile of each item at its start), read back from shared memory: at D = 128,
    whose tiles are built 16 rows at a time, the forward -5% to -7% and the dq pass -2% to -4%; at D = 64 the forward
    +5% and the dq pass +3% to +5% at long N (session 35, H200).

    Copying V instead of loading it through registers took 2% to 7% off the forward and the dq pass, most at D = 128
    (session 34)."""
    (MuK, V, Freqs, Delta, _, _, _, n_k, _, stride_vb, stride_vh, stride_vn, kc_s, ks_s, v_s, ready, _, _,
     mu_s) = ring
    dtype: gl.constexpr = V.dtype.element_ty
    blocked: gl.constexpr = _BLOCKED
    key_rows = gl.arange(0, BUILD_ROWS, layout=gl.SliceLayout(1, blocked))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blocked))
    rounds = _rounds(ring, ORDER)
    done = 0  # tiles of the earlier items: the ring's position
    for r in range(rounds):
        valid, _, b, h, bh, n_tiles = _work(ring, r, CAUSAL, BLOCK_N, ORDER, HALVES)
        if valid:
            # key phases s theta + delta of the first rows, advanced BUILD_ROWS rows at a time by angle addition (as
            # flash.py); the frequencies reloaded for each item rather than held in registers between items
            freqs = gl.load(Freqs + d)
            cos, sin = _cos_sin(gl.expand_dims(key_rows.to(gl.float32), 1) * gl.expand_dims(freqs, 0)
                                + gl.expand_dims(gl.load(Delta + h * HEAD_DIM + d), 0))
            step_cos, step_sin = _cos_sin(BUILD_ROWS * freqs)
            step_cos = gl.expand_dims(step_cos, 0)
            step_sin = gl.expand_dims(step_sin, 0)
            mu_base = MuK + bh.to(gl.int64) * n_k * HEAD_DIM
            v_base = V + b.to(gl.int64) * stride_vb + h * stride_vh
            if STAGED_MU:  # copies in flight, in commit order: mu of tile 0, then per tile t mu of t + 1 and V of t
                _copy_rows(mu_s, done % 2, mu_base, HEAD_DIM, 0, n_k, key_rows, d, HEAD_DIM, BLOCK_N, 1)
                async_copy.commit_group()
            for t in range(n_tiles):
                stage = (done + t) % STAGES
                if STAGED_MU:
                    slot = (done + t) % 2
                    if t + 1 < n_tiles:  # (into the slot the last tile read: every thread passed its barrier)
                        _copy_rows(mu_s, 1 - slot, mu_base, HEAD_DIM, (t + 1) * BLOCK_N, n_k, key_rows, d, HEAD_DIM,
                                   BLOCK_N, 1)
                    async_copy.commit_group()
                    _take_stage(v_s, stage, done + t, v_base, stride_vn, t * BLOCK_N, n_k, key_rows, d, HEAD_DIM,
                                BLOCK_N, STAGES)
                    async_copy.wait_group(2)  # this tile's mu
                    _barrier()  # (each thread waited for its own copies; it reads others')
                for c in gl.static_range(BLOCK_N // BUILD_ROWS):
                    if STAGED_MU:
                        mu = mu_s.index(slot).slice(c * BUILD_ROWS, BUILD_ROWS).load(blocked)
                    else:
                        rows = t * BLOCK_N + c * BUILD_ROWS + key_rows
                        ok = gl.expand_dims(rows < n_k, 1)  # past the keys: zeros (their scores are masked)
                        mu = gl.load(mu_base + gl.expand_dims(rows, 1) * HEAD_DIM + gl.expand_dims(d, 0), mask=ok,
                                     other=0.0)
                        if c == 0:  # (the first rows' loads are in flight while it waits)
                            _take_stage(v_s, stage, done + t, v_base, stride_vn, t * BLOCK_N, n_k, key_rows, d,
                                        HEAD_DIM, BLOCK_N, STAGES)
                    mu = mu.to(gl.float32)
                    kc_s.index(stage).slice(c * BUILD_ROWS, BUILD_ROWS).store((mu * cos).to(dtype))
                    ks_s.index(stage).slice(c * BUILD_ROWS, BUILD_ROWS).store((mu * sin).to(dtype))
                    cos, sin = cos * step_cos - sin * step_sin, sin * step_cos + cos * step_sin
                async_copy.wait_group(0)  # this tile's V
                _barrier()
                fence_async_shared()  # generic-proxy stores, read next by the tensor cores (async proxy)
                mbarrier.arrive(ready.index(stage), count=1)
            done += n_tiles
    _drain(done, STAGES)


@gluon.jit
def _take_stage(v_s, stage, position, v_base, stride_vn, k0, n_k, key_rows, d, HEAD_DIM: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Wait until both consumers are done with the stage's last tile (the ring's tile `position`), then copy V's keys
    k0 .. into it by cp.async (one commit group)."""
    if position >= STAGES:
        _acquire(stage)
    _copy_rows(v_s, stage, v_base, stride_vn, k0, n_k, key_rows, d, HEAD_DIM, BLOCK_N, 1)
    async_copy.commit_group()


# ---------------------------------------------------------------------------------------------------------
# The consumers' common parts


@gluon.jit
def _rows(X, b, h, stride_b, stride_h, stride_n, r0, n, HEAD_DIM: gl.constexpr, layout: gl.constexpr):
    """Rows r0 .. r0+63 of head (b, h) of a (B, H, N, D) tensor with unit last stride (zeros past n): HEAD_DIM
    channels from X's pointer (all of them, or a channel part: channel_parts)."""
    rows = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    return gl.load(X + b.to(gl.int64) * stride_b + h * stride_h + gl.expand_dims(rows, 1) * stride_n
                   + gl.expand_dims(d, 0), mask=gl.expand_dims(rows < n, 1), other=0.0)


@gluon.jit
def _store_rows(X, b, h, stride_b, stride_h, stride_n, r0, n, value, HEAD_DIM: gl.constexpr):
    """value (64, HEAD_DIM) into rows r0 .. r0+63 of head (b, h) of a (B, H, N, D) tensor with unit last stride,
    HEAD_DIM channels from X's pointer (rows past n left alone): _rows' store."""
    layout: gl.constexpr = value.type.layout
    rows = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    gl.store(X + b.to(gl.int64) * stride_b + h * stride_h + gl.expand_dims(rows, 1) * stride_n + gl.expand_dims(d, 0),
             value, mask=gl.expand_dims(rows < n, 1))


@gluon.jit
def _query_rows(Q, b, h, stride_qb, stride_qh, stride_qn, r0, n_q, q_offset, freqs_ptr,
                HEAD_DIM: gl.constexpr, layout: gl.constexpr):
    """Queries r0 .. r0+63 of Q (zeros past n_q) in `layout`, and cos, sin of their phases t theta (fp32)."""
    rows = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    q = _rows(Q, b, h, stride_qb, stride_qh, stride_qn, r0, n_q, HEAD_DIM, layout)
    cos, sin = _cos_sin(gl.expand_dims((q_offset + rows).to(gl.float32), 1) * gl.expand_dims(gl.load(freqs_ptr + d), 0))
    return q, cos, sin


@gluon.jit
def _stage_query_halves(X, b, h, stride_xb, stride_xh, stride_xn, r0, n_q, q_offset, Freqs, qk_scale, qc, qs,
                        HEAD_DIM: gl.constexpr, SOFTPLUS: gl.constexpr):
    """Queries r0 .. r0+63 as their halves in shared memory (qc, qs), built as flash.py's _query_block does (mu
    rounded first, sm_scale log2(e) folded in), from the raw queries X (SOFTPLUS) or their magnitudes X.

    Past 64 channels, 64 at a time with a warpgroup barrier between the parts: the D = 128 forward's whole rows
    spilled (4 local-memory instructions under triton 3.9, 41 under 3.6), and so did the parts without the barrier
    (14 under 3.9); with it, none."""
    dtype: gl.constexpr = qc.dtype
    PARTS: gl.constexpr = 2 if HEAD_DIM > 64 else 1
    for part in gl.static_range(PARTS):
        if part > 0:
            _barrier()
        x, cos, sin = _query_rows(X + part * (HEAD_DIM // PARTS), b, h, stride_xb, stride_xh, stride_xn, r0, n_q,
                                  q_offset, Freqs + part * (HEAD_DIM // PARTS), HEAD_DIM // PARTS, _BLOCKED)
        mu = _softplus(x.to(gl.float32)).to(dtype).to(gl.float32) if SOFTPLUS else x.to(gl.float32)
        _channels(qc, part, PARTS).store((mu * (cos * qk_scale)).to(dtype))
        _channels(qs, part, PARTS).store((mu * (sin * qk_scale)).to(dtype))


@gluon.jit
def _key_range(r0, n_k, q_offset, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tiles seen by query rows r0 .. r0+63, and the first key of the tiles that need the mask."""
    if CAUSAL:  # a warpgroup's keys end before the program's (the other warpgroup's rows may come later)
        hi = gl.minimum(q_offset + r0 + 64, n_k)
        full = gl.minimum(q_offset + r0 + 1, n_k) // BLOCK_N * BLOCK_N
    else:
        hi = n_k
        full = n_k // BLOCK_N * BLOCK_N
    return gl.cdiv(hi, BLOCK_N), full


@gluon.jit
def _keep(t, n_k, q_pos, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, layout: gl.constexpr):
    """Which (query, key) pairs of tile t count: keys inside the sequence and, if causal, not after the query."""
    cols = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    keep = gl.expand_dims(cols < n_k, 0)
    if CAUSAL:
        keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(q_pos, 1))
    return keep


@gluon.jit
def _scores(qc, qs, kc_s, ks_s, stage, s_init):
    """S = qc kc^T + qs ks^T of the staged tile, issued on the tensor cores (not waited for)."""
    s = warpgroup_mma(qc, kc_s.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
    return warpgroup_mma(qs, ks_s.index(stage).permute((1, 0)), s, is_async=True)


@gluon.jit
def _consumer(ring, rows, CAUSAL: gl.constexpr, ORDER: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, WG: gl.constexpr, DQ: gl.constexpr, HALVES: gl.constexpr):
    """Warpgroup WG's 64 query rows of each of the program's work items: the dq pass's (_dq_rows) if DQ, else the
    forward's (_fwd_rows). (Gluon's partitions take no function as an argument.)"""
    rounds = _rounds(ring, ORDER)
    done = 0  # tiles of the earlier items: the ring's position
    for r in range(rounds):
        valid, start_m, b, h, bh, n_tiles = _work(ring, r, CAUSAL, BLOCK_N, ORDER, HALVES)
        if valid:
            if DQ:
                _dq_rows(ring, rows, done, start_m + (64 * WG if HALVES == 1 else 0), b, h, bh, n_tiles, CAUSAL,
                         HEAD_DIM, BLOCK_N, STAGES, HALVES, WG)
            else:
                _fwd_rows(ring, rows, done, start_m + 64 * WG, b, h, bh, n_tiles, CAUSAL, HEAD_DIM, BLOCK_N, STAGES, WG)
            done += n_tiles


# ---------------------------------------------------------------------------------------------------------
# Forward


@gluon.jit
def _fwd_rows(ring, rows, done, r0, b, h, bh, n_tiles, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr):
    """Query rows r0 .. r0+63 of head (b, h) against the item's key tiles, the ring's tiles done .. done+n_tiles-1:
    scores, online softmax, P V; writes out and lse."""
    (Q, Out, Lse, stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, n_q, qk_scale, qc_s, qs_s) = rows
    Freqs, n_k, q_offset, kc_s, ks_s, v_s, ready = ring[2], ring[7], ring[8], ring[12], ring[13], ring[14], ring[15]
    dtype: gl.constexpr = Out.dtype.element_ty
    s_mma: gl.constexpr = _wgmma_layout(BLOCK_N)
    o_mma: gl.constexpr = _wgmma_layout(HEAD_DIM)
    p_layout: gl.constexpr = _operand_layout(HEAD_DIM)

    qc = qc_s.index(WG)
    qs = qs_s.index(WG)
    # (the last item's products, which read these, were waited for)
    _stage_query_halves(Q, b, h, stride_qb, stride_qh, stride_qn, r0, n_q, q_offset, Freqs, qk_scale, qc, qs, HEAD_DIM,
                        True)
    fence_async_shared()  # generic-proxy stores, read next by the tensor cores (async proxy)
    _barrier()

    my_tiles, full = _key_range(r0, n_k, q_offset, CAUSAL, BLOCK_N)
    q_pos = q_offset + r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_mma))
    acc = gl.zeros([64, HEAD_DIM], gl.float32, o_mma)
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_mma))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_mma))
    s_init = gl.zeros([64, BLOCK_N], gl.float32, s_mma)
    for t in range(my_tiles):
        stage = (done + t) % STAGES
        mbarrier.wait(ready.index(stage), ((done + t) // STAGES) & 1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(_scores(qc, qs, kc_s, ks_s, stage, s_init),))
        if t * BLOCK_N >= full:
            s = gl.where(_keep(t, n_k, q_pos, CAUSAL, BLOCK_N, s_mma), s, float("-inf"))
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
        _release(stage)
    _release_unread(ready, done + my_tiles, done + n_tiles, STAGES)

    out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_mma)), 1)
    _store_rows(Out, b, h, stride_ob, stride_oh, stride_on, r0, n_q, out.to(dtype), HEAD_DIM)
    lse_rows = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_mma))
    gl.store(Lse + bh.to(gl.int64) * n_q + lse_rows, m_i + gl.log2(l_i), mask=lse_rows < n_q)


@gluon.jit
def _fwd_kernel(Q, MuK, V, Freqs, Delta, Out, Lse, Listed,
                stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                n_heads, bh_count, n_q, n_k, q_offset, listed_rounds, qk_scale,
                CAUSAL: gl.constexpr, ORDER: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, BUILD_ROWS: gl.constexpr, STAGED_MU: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                PRODUCER_REGS: gl.constexpr):
    ring = _ring(MuK, V, Freqs, Delta, stride_vb, stride_vh, stride_vn, n_heads, bh_count, gl.cdiv(n_q, 128), n_k,
                 q_offset, Listed, listed_rounds, HEAD_DIM, BLOCK_N, STAGES, STAGED_MU)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], Q.dtype.element_ty)
    qc_s = gl.allocate_shared_memory(Q.dtype.element_ty, [2, 64, HEAD_DIM], q_layout)
    qs_s = gl.allocate_shared_memory(Q.dtype.element_ty, [2, 64, HEAD_DIM], q_layout)
    rows = (Q, Out, Lse, stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, n_q, qk_scale, qc_s, qs_s)
    # Gluon hands constexprs to a partition only as direct elements of its argument tuple
    gl.warp_specialize([(_consumer, (ring, rows, CAUSAL, ORDER, HEAD_DIM, BLOCK_N, STAGES, 0, False, 1)),
                        (_consumer, (ring, rows, CAUSAL, ORDER, HEAD_DIM, BLOCK_N, STAGES, 1, False, 1)),
                        (_producer, (ring, CAUSAL, ORDER, HEAD_DIM, BLOCK_N, STAGES, BUILD_ROWS, 1, STAGED_MU))],
                       [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


# ---------------------------------------------------------------------------------------------------------
# Backward: the dq pass


@gluon.jit
def _dq_rows(ring, rows, done, r0, b, h, bh, n_tiles, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HALVES: gl.constexpr, WG: gl.constexpr):
    """Query rows r0 .. r0+63 of head (b, h) against the item's key tiles, the ring's tiles done .. done+n_tiles-1:
    D = rowsum(dO O) (written for the dk/dv pass, which runs next), then P and dS recomputed tile by tile, gc = dS kc
    and gs = dS ks accumulated, and dq = sigmoid(q) (cos(t theta) gc + sin(t theta) gs) sm_scale (flash.py's
    _polar_grad); writes D and dq. With HALVES = 2 both consumers take these rows (their qc, qs and dO staged once,
    in shared buffers), each for half the channels of gc, gs and dq."""
    (Q, MuQ, Out, DO, Lse, Dvec, DQ, stride_qb, stride_qh, stride_qn, stride_mb, stride_mh, stride_ob, stride_oh,
     stride_on, stride_dob, stride_doh, stride_don, stride_gb, stride_gh, stride_gn, n_q, qk_scale, sm_scale, qc_s,
     qs_s, do_s) = rows
    Freqs, n_k, q_offset, kc_s, ks_s, v_s, ready = ring[2], ring[7], ring[8], ring[12], ring[13], ring[14], ring[15]
    dtype: gl.constexpr = DQ.dtype.element_ty
    blocked: gl.constexpr = _BLOCKED
    CHANNELS: gl.constexpr = HEAD_DIM // HALVES
    c0 = 0 if HALVES == 1 else CHANNELS * WG  # this consumer's channels of gc, gs and dq
    s_mma: gl.constexpr = _wgmma_layout(BLOCK_N)
    o_mma: gl.constexpr = _wgmma_layout(CHANNELS)
    ds_layout: gl.constexpr = _operand_layout(CHANNELS)

    qc = qc_s.index(WG if HALVES == 1 else 0)
    qs = qs_s.index(WG if HALVES == 1 else 0)
    do = do_s.index(WG if HALVES == 1 else 0)  # (this consumer's last products, which read these, were waited for)
    if HALVES == 2:
        _consumers_sync(_CONSUMERS_BARRIER)  # and so were the other's, before the buffers they share are refilled
    # qc, qs (the first consumer's, if shared) and dO (the second's) staged, and D = rowsum(dO O) summed, CHANNELS
    # channels at a time
    for part in gl.static_range(HALVES):
        if WG == 0 or HALVES == 1:
            # from the backward pre-pass's magnitudes (the values the forward rounded): no softplus here
            _stage_query_halves(MuQ + part * CHANNELS, b, h, stride_mb, stride_mh, HEAD_DIM, r0, n_q, q_offset,
                                Freqs + part * CHANNELS, qk_scale, _channels(qc, part, HALVES),
                                _channels(qs, part, HALVES), CHANNELS, False)
        do_rows = _rows(DO + part * CHANNELS, b, h, stride_dob, stride_doh, stride_don, r0, n_q, CHANNELS, blocked)
        if WG == 1 or HALVES == 1:
            _channels(do, part, HALVES).store(do_rows)
        if part == HALVES - 1:
            fence_async_shared()  # generic-proxy stores, read next by the tensor cores (async proxy)
        out = _rows(Out + part * CHANNELS, b, h, stride_ob, stride_oh, stride_on, r0, n_q, CHANNELS, blocked)
        if part == 0:
            dvec = gl.sum(do_rows.to(gl.float32) * out.to(gl.float32), 1)  # zero past n_q
        else:
            dvec += gl.sum(do_rows.to(gl.float32) * out.to(gl.float32), 1)
    d_rows = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, blocked))
    if WG == 0 or HALVES == 1:
        gl.store(Dvec + bh.to(gl.int64) * n_q + d_rows, dvec, mask=d_rows < n_q)
    dvec = gl.convert_layout(dvec, gl.SliceLayout(1, s_mma))
    if HALVES == 1:
        _barrier()
    else:
        _consumers_sync(_CONSUMERS_BARRIER)
    s_rows = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_mma))
    lse = gl.load(Lse + bh.to(gl.int64) * n_q + s_rows, mask=s_rows < n_q, other=float("inf"))  # padded rows: P = 0

    my_tiles, full = _key_range(r0, n_k, q_offset, CAUSAL, BLOCK_N)
    q_pos = q_offset + s_rows
    gc = gl.zeros([64, CHANNELS], gl.float32, o_mma)
    gs = gl.zeros([64, CHANNELS], gl.float32, o_mma)
    s_init = gl.zeros([64, BLOCK_N], gl.float32, s_mma)
    for t in range(my_tiles):
        stage = (done + t) % STAGES
        mbarrier.wait(ready.index(stage), ((done + t) // STAGES) & 1)
        s = _scores(qc, qs, kc_s, ks_s, stage, s_init)
        dp = warpgroup_mma(do, v_s.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
        s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
        p = gl.exp2(s - gl.expand_dims(lse, 1))
        if t * BLOCK_N >= full:
            p = gl.where(_keep(t, n_k, q_pos, CAUSAL, BLOCK_N, s_mma), p, 0.0)
        ds = gl.convert_layout((p * (dp - gl.expand_dims(dvec, 1))).to(dtype), ds_layout)
        gc = warpgroup_mma(ds, _channels(kc_s.index(stage), WG, HALVES), gc, is_async=True)
        gs = warpgroup_mma(ds, _channels(ks_s.index(stage), WG, HALVES), gs, is_async=True)
        gc, gs = warpgroup_mma_wait(num_outstanding=0, deps=(gc, gs))  # dS's registers: as P V in the forward
        _release(stage)
    _release_unread(ready, done + my_tiles, done + n_tiles, STAGES)

    q, cos, sin = _query_rows(Q + c0, b, h, stride_qb, stride_qh, stride_qn, r0, n_q, q_offset, Freqs + c0, CHANNELS,
                              o_mma)
    x = q.to(gl.float32)
    dq = (cos * gc + sin * gs) * sm_scale / (1.0 + gl.exp2(-x * _LOG2E))  # sigmoid(q) (...)
    _store_rows(DQ + c0, b, h, stride_gb, stride_gh, stride_gn, r0, n_q, dq.to(dtype), CHANNELS)


@gluon.jit
def _channels(tile, part, HALVES: gl.constexpr):
    """Channel part `part` of HALVES of a shared-memory tile (rows, channels): a view of its columns."""
    if HALVES == 1:
        return tile
    else:
        return tile.slice(part * (tile.shape[1] // HALVES), tile.shape[1] // HALVES, dim=1)


@gluon.jit
def _dq_kernel(Q, MuQ, MuK, V, Freqs, Delta, Out, DO, Lse, Dvec, DQ, Listed,
               stride_qb, stride_qh, stride_qn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
               stride_dob, stride_doh, stride_don, stride_gb, stride_gh, stride_gn,
               n_heads, bh_count, n_q, n_k, q_offset, listed_rounds, sm_scale, qk_scale,
               CAUSAL: gl.constexpr, ORDER: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, BUILD_ROWS: gl.constexpr, HALVES: gl.constexpr, STAGED_MU: gl.constexpr,
               CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    # HALVES = 1: each consumer owns 64 query rows at every channel (128 rows an item). HALVES = 2 (D = 128, where gc
    # and gs of 64 rows at every channel would take 128 registers a thread): both consumers take the same 64 rows,
    # each owning half the channels of gc and gs; each computes the whole S and dP (_dq_rows).
    ring = _ring(MuK, V, Freqs, Delta, stride_vb, stride_vh, stride_vn, n_heads, bh_count,
                 gl.cdiv(n_q, 128 // HALVES), n_k, q_offset, Listed, listed_rounds, HEAD_DIM, BLOCK_N, STAGES,
                 STAGED_MU)
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], dtype)
    qc_s = gl.allocate_shared_memory(dtype, [2 // HALVES, 64, HEAD_DIM], q_layout)  # by consumer, or shared
    qs_s = gl.allocate_shared_memory(dtype, [2 // HALVES, 64, HEAD_DIM], q_layout)
    do_s = gl.allocate_shared_memory(dtype, [2 // HALVES, 64, HEAD_DIM], q_layout)
    # mu_q is contiguous
    rows = (Q, MuQ, Out, DO, Lse, Dvec, DQ, stride_qb, stride_qh, stride_qn, n_heads * n_q * HEAD_DIM, n_q * HEAD_DIM,
            stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, stride_gb, stride_gh, stride_gn,
            n_q, qk_scale, sm_scale, qc_s, qs_s, do_s)
    gl.warp_specialize([(_consumer, (ring, rows, CAUSAL, ORDER, HEAD_DIM, BLOCK_N, STAGES, 0, True, HALVES)),
                        (_consumer, (ring, rows, CAUSAL, ORDER, HEAD_DIM, BLOCK_N, STAGES, 1, True, HALVES)),
                        (_producer, (ring, CAUSAL, ORDER, HEAD_DIM, BLOCK_N, STAGES, BUILD_ROWS, HALVES,
                                     STAGED_MU))],
                       [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


# ---------------------------------------------------------------------------------------------------------
# Backward: the dk, dv and d delta pass (keys stationary, query tiles streamed)


# Folded rows: the dk/dv consumers need each query tile's -lse (P^T = exp2(S^T - lse)) and -D (dS^T = P^T (dP^T -
# D)) along their score tiles' columns, which at 64 queries a tile would take 32 more registers per thread than they
# have. Instead the producer stages them as a (queries, 16) tile each, the value rounded to the input dtype in column
# 0 and its remainder in column 1 (so about 16 bits of it), and the consumers add them to S^T and dP^T by one more
# k-step of those products, against a key-side tile with ones in columns 0 and 1. Session 21 (attention_notes.md).
_FOLD = gl.constexpr(gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0]))  # a (32 or 64, 16) tile in registers
_PADDED_LSE = gl.constexpr(30000.0)  # queries past n_q: P = exp2(0 - 30000) = 0; finite, so its remainder is 0


@gluon.jit
def _folded(x, dtype: gl.constexpr):
    """x (32 rows, fp32) as a folded-rows tile (32, 16) in dtype: x rounded to dtype in column 0, x's remainder in
    column 1, zeros elsewhere."""
    high = x.to(dtype).to(gl.float32)
    col = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, _FOLD)), 0)
    zeros = gl.zeros([32, 16], gl.float32, _FOLD)
    return gl.where(col == 0, gl.expand_dims(high, 1) + zeros,
                    gl.where(col == 1, gl.expand_dims(x - high, 1) + zeros, zeros)).to(dtype)


@gluon.jit
def _copy_rows(dst, first_buffer, base, stride_n, r0, n, piece_rows, d, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
               HALVES: gl.constexpr):
    """cp.async of rows r0 .. r0 + BLOCK_M - 1 of the (rows, HEAD_DIM) matrix at `base` (row stride stride_n) into
    dst's buffers first_buffer + part, one per channel part; zeros from row n on. len(piece_rows) rows at a time: the
    addresses of a whole tile would take 64 registers a thread."""
    CHANNELS: gl.constexpr = HEAD_DIM // HALVES
    PIECE: gl.constexpr = piece_rows.shape[0]
    for piece in gl.static_range(BLOCK_M // PIECE):
        rows = r0 + piece * PIECE + piece_rows
        for part in gl.static_range(HALVES):
            _async_load(dst.index(first_buffer + part).slice(piece * PIECE, PIECE),
                        base + gl.expand_dims(rows * stride_n, 1) + gl.expand_dims(part * CHANNELS + d, 0),
                        mask=gl.expand_dims(rows < n, 1))


@gluon.jit
def _query_producer(qring, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                    HALVES: gl.constexpr):
    """The query tiles a key block sees, in order: qc, qs (from the prepass's mu_q, at phases t theta with sm_scale
    log2(e) folded in), dO, and the queries' -lse and -D as folded rows into the ring's stages, each channel part into
    buffer stage * HALVES + part (_dkdv_kernel).

    This producer bounds the pass (session 32: with its phase math replaced by one multiply the pass took 15-22% less
    time), so it does as little as it can itself:
    - dO goes by cp.async straight from global memory into its stage, and mu_q into a staging buffer of two slots one
      tile ahead (_copy_rows). No load waits in its registers, and no copy takes its instructions: against loading
      both into registers, the pass -5% to -7% at D = 64 and -3% to -4% at D = 128 (session 33, attention_notes.md).
    - The phases, with one channel part: those of the next 32 rows are held in registers and advanced 32 rows at a
      time by angle addition, as flash.py's dk/dv pass and the forward's key producer do (four FMAs an element
      against two SFU ops and six more instructions computed directly: the pass -8% to -12% at D = 64, session 32).
      With two parts (D = 128) both parts' state needs 120 registers here, and at 192 triton 3.9's first consumer
      spills; in 8-row pieces it fits, but costs what it saves (session 33). There each 16-row piece's phases are
      computed directly.
    mu and dO are read PIECE rows and HEAD_DIM // HALVES channels at a time, as many elements a thread at every
    head dim."""
    (MuQ, DO, Lse, Dvec, Freqs, b, h, bh, n_q, q_offset, qk_scale, stride_dob, stride_doh, stride_don, lo, n_tiles,
     qc_s, qs_s, do_s, lse_s, dvec_s, ready, empty, mu_s) = qring
    dtype: gl.constexpr = DO.dtype.element_ty
    blocked: gl.constexpr = _BLOCKED
    CHANNELS: gl.constexpr = HEAD_DIM // HALVES
    PIECE: gl.constexpr = 32 // HALVES
    piece_rows = gl.arange(0, PIECE, layout=gl.SliceLayout(1, blocked))
    folded_rows = gl.arange(0, 32, layout=gl.SliceLayout(1, _FOLD))
    d = gl.arange(0, CHANNELS, layout=gl.SliceLayout(0, blocked))
    mu_base = MuQ + bh.to(gl.int64) * n_q * HEAD_DIM  # mu_q is contiguous
    do_base = DO + b.to(gl.int64) * stride_dob + h * stride_doh
    if HALVES == 1:  # the phases of rows lo .., advanced PIECE rows at a time
        freqs = gl.load(Freqs + d)
        cos, sin = _cos_sin(gl.expand_dims((q_offset + lo + piece_rows).to(gl.float32), 1) * gl.expand_dims(freqs, 0))
        cos, sin = cos * qk_scale, sin * qk_scale
        step_cos, step_sin = _cos_sin(PIECE * freqs)
        step_cos, step_sin = gl.expand_dims(step_cos, 0), gl.expand_dims(step_sin, 0)
    # Copies in flight, in commit order: mu of tile 0; then for each tile t, dO of t and mu of t + 1 (past the last
    # tile: none, every row masked). Rows past n_q are zeros (and their P = 0, by their lse).
    _copy_rows(mu_s, 0, mu_base, HEAD_DIM, lo, n_q, piece_rows, d, HEAD_DIM, BLOCK_M, HALVES)
    async_copy.commit_group()
    for t in range(n_tiles):
        stage = t % STAGES
        r0 = lo + t * BLOCK_M
        mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)  # both consumers are done with its last tile
        _copy_rows(do_s, stage * HALVES, do_base, stride_don, r0, n_q, piece_rows, d, HEAD_DIM, BLOCK_M, HALVES)
        async_copy.commit_group()
        _copy_rows(mu_s, (t + 1) % 2 * HALVES, mu_base, HEAD_DIM, r0 + BLOCK_M, gl.where(t + 1 < n_tiles, n_q, 0),
                   piece_rows, d, HEAD_DIM, BLOCK_M, HALVES)
        async_copy.commit_group()
        async_copy.wait_group(2)  # this tile's mu, copied during the last one
        _barrier()  # (each thread waited for its own copies; it reads others')
        for c in gl.static_range(BLOCK_M // 32):
            f_rows = r0 + c * 32 + folded_rows
            lse = gl.load(Lse + bh.to(gl.int64) * n_q + f_rows, mask=f_rows < n_q, other=_PADDED_LSE)
            dvec = gl.load(Dvec + bh.to(gl.int64) * n_q + f_rows, mask=f_rows < n_q, other=0.0)
            for piece in gl.static_range(32 // PIECE):
                for part in gl.static_range(HALVES):
                    mu = mu_s.index(t % 2 * HALVES + part).slice(c * 32 + piece * PIECE, PIECE).load(blocked)
                    mu = mu.to(gl.float32)
                    if HALVES == 1:
                        qc, qs = mu * cos, mu * sin
                        cos, sin = cos * step_cos - sin * step_sin, sin * step_cos + cos * step_sin
                    else:
                        # (the frequencies reloaded each piece: held for both parts, they spill)
                        rows = r0 + c * 32 + piece * PIECE + piece_rows
                        piece_cos, piece_sin = _cos_sin(gl.expand_dims((q_offset + rows).to(gl.float32), 1)
                                                        * gl.expand_dims(gl.load(Freqs + part * CHANNELS + d), 0))
                        qc, qs = mu * (piece_cos * qk_scale), mu * (piece_sin * qk_scale)
                    qc_s.index(stage * HALVES + part).slice(c * 32 + piece * PIECE, PIECE).store(qc.to(dtype))
                    qs_s.index(stage * HALVES + part).slice(c * 32 + piece * PIECE, PIECE).store(qs.to(dtype))
            lse_s.index(stage).slice(c * 32, 32).store(_folded(-lse, dtype))
            dvec_s.index(stage).slice(c * 32, 32).store(_folded(-dvec, dtype))
        async_copy.wait_group(1)  # this tile's dO
        _barrier()  # (every thread's copies landed before the one thread that arrives)
        fence_async_shared()
        mbarrier.arrive(ready.index(stage), count=1)
    async_copy.wait_group(0)


@gluon.jit
def _key_rows(K, freqs, delta, b, h, stride_kb, stride_kh, stride_kn, k0, n_k, CHANNELS: gl.constexpr,
              layout: gl.constexpr):
    """Keys k0 .. k0+63 of K (zeros past n_k; CHANNELS channels from K's pointer) in `layout`, and cos, sin of their
    phases s theta + delta (fp32) for the frequencies and deltas of those channels (pointers to the first)."""
    rows = k0 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    d = gl.arange(0, CHANNELS, layout=gl.SliceLayout(0, layout))
    k = _rows(K, b, h, stride_kb, stride_kh, stride_kn, k0, n_k, CHANNELS, layout)
    cos, sin = _cos_sin(gl.expand_dims(rows.to(gl.float32), 1) * gl.expand_dims(gl.load(freqs + d), 0)
                        + gl.expand_dims(gl.load(delta + d), 0))
    return k, cos, sin


@gluon.jit
def _dkdv_tile(t, dv, gc, gs, kc, ks, vk, ones, s_init, keys, n_k, qring, MASKED: gl.constexpr,
               CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """A dk/dv consumer's query tile t: S^T - lse, dP^T - D = V dO^T - D (-lse and -D through the products, against
    `ones`: _folded), P^T (masked if MASKED), dV += P^T dO, dS^T = P^T (dP^T - D), gc += dS^T qc and gs += dS^T qs;
    then the stage released."""
    (_, _, _, _, _, _, _, _, _, q_offset, _, _, _, _, lo, _, qc_s, qs_s, do_s, lse_s, dvec_s, ready, empty, _) = qring
    op_layout: gl.constexpr = _operand_layout(HEAD_DIM)
    stage = t % STAGES
    mbarrier.wait(ready.index(stage), (t // STAGES) & 1)
    st = warpgroup_mma(kc, qc_s.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
    st = warpgroup_mma(ks, qs_s.index(stage).permute((1, 0)), st, is_async=True)
    st = warpgroup_mma(ones, lse_s.index(stage).permute((1, 0)), st, is_async=True)
    dpt = warpgroup_mma(vk, do_s.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
    dpt = warpgroup_mma(ones, dvec_s.index(stage).permute((1, 0)), dpt, is_async=True)
    st, dpt = warpgroup_mma_wait(num_outstanding=0, deps=(st, dpt))
    pt = _probabilities(st, lo + t * BLOCK_M, keys, n_k, q_offset, MASKED, CAUSAL)
    dst = gl.convert_layout((pt * dpt).to(vk.dtype), op_layout)
    pt = gl.convert_layout(pt.to(vk.dtype), op_layout)
    dv = warpgroup_mma(pt, do_s.index(stage), dv, is_async=True)
    gc = warpgroup_mma(dst, qc_s.index(stage), gc, is_async=True)
    gs = warpgroup_mma(dst, qs_s.index(stage), gs, is_async=True)
    dv, gc, gs = warpgroup_mma_wait(num_outstanding=0, deps=(dv, gc, gs))
    mbarrier.arrive(empty.index(stage), count=1)
    return dv, gc, gs


@gluon.jit
def _probabilities(st, q0, keys, n_k, q_offset, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """P^T = exp2(S^T - lse) of the queries q0 .. (st's columns), masked if MASKED: zero past n_k and, if causal,
    where the key comes after the query."""
    cols = q0 + gl.arange(0, st.shape[1], layout=gl.SliceLayout(0, st.type.layout))
    pt = gl.exp2(st)
    if MASKED:
        keep = gl.expand_dims(keys < n_k, 1)
        if CAUSAL:
            keep = keep & (gl.expand_dims(keys, 1) <= gl.expand_dims(q_offset + cols, 0))
        pt = gl.where(keep, pt, 0.0)
    return pt


@gluon.jit
def _dkdv_tile_shared(t, dv, gc, gs, kc_own, ks_own, v_own, ones, handed, s_init, keys, n_k, qring,
                      MASKED: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                      WG: gl.constexpr):
    """Query tile t for consumer WG of two that share their 64 keys, each accumulating dV, gc and gs for its half of
    the channels (_dkdv_kernel, HALVES = 2). The second computes dP^T - D and hands it over in shared memory; the
    first computes S^T - lse (summed over both halves' buffers), P^T and dS^T = P^T (dP^T - D), rounded as
    _dkdv_tile rounds them, one half of the tile's queries at a time (the whole tile spilled), and hands P^T and dS^T
    back. Then both issue their channels' dV += P^T dO, gc += dS^T qc, gs += dS^T qs from there, and release the
    stage. Each handover is a named barrier. One buffer each suffices: the second refills dP^T only after the first
    has handed back dS^T (so has read dP^T), and the first refills P^T and dS^T only after the second has handed over
    the next dP^T, which it computes after waiting for its products of this tile."""
    (_, _, _, _, _, _, _, _, _, q_offset, _, _, _, _, lo, _, qc_s, qs_s, do_s, lse_s, dvec_s, ready, empty, _) = qring
    pt_s, dst_s, dpt_s = handed  # P^T and dS^T by query half; dP^T - D (fp32)
    HALF: gl.constexpr = BLOCK_M // 2
    half_mma: gl.constexpr = _wgmma_layout(BLOCK_M // 2)
    dtype: gl.constexpr = ones.dtype
    stage = t % STAGES
    mbarrier.wait(ready.index(stage), (t // STAGES) & 1)
    if WG == 0:
        half_keys = gl.convert_layout(keys, gl.SliceLayout(1, half_mma))  # (the same registers)
        for half in gl.static_range(2):
            st = gl.zeros([64, BLOCK_M // 2], gl.float32, half_mma)
            for part in gl.static_range(2):  # S^T over both channel halves' buffers
                st = warpgroup_mma(kc_own.index(part),
                                   qc_s.index(stage * 2 + part).slice(half * HALF, HALF).permute((1, 0)), st,
                                   use_acc=part > 0, is_async=True)
            for part in gl.static_range(2):
                st = warpgroup_mma(ks_own.index(part),
                                   qs_s.index(stage * 2 + part).slice(half * HALF, HALF).permute((1, 0)), st,
                                   is_async=True)
            st = warpgroup_mma(ones, lse_s.index(stage).slice(half * HALF, HALF).permute((1, 0)), st, is_async=True)
            st = warpgroup_mma_wait(num_outstanding=0, deps=(st,))
            pt = _probabilities(st, lo + t * BLOCK_M + half * HALF, half_keys, n_k, q_offset, MASKED, CAUSAL)
            if half == 0:  # the second's dP^T is ready, and so (it waited for them) are its last tile's products
                _consumers_sync(_DP_READY)  # that read P^T and dS^T
            pt_s.index(half).store(pt.to(dtype))
            dst_s.index(half).store((pt * dpt_s.slice(half * HALF, HALF, dim=1).load(half_mma)).to(dtype))
        fence_async_shared()  # read next by the tensor cores, both consumers'
        _consumers_arrive(_DS_READY)
    else:
        dpt = s_init
        for part in gl.static_range(2):
            dpt = warpgroup_mma(v_own.index(part), do_s.index(stage * 2 + part).permute((1, 0)), dpt,
                                use_acc=part > 0, is_async=True)
        dpt = warpgroup_mma(ones, dvec_s.index(stage).permute((1, 0)), dpt, is_async=True)
        dpt_s.store(warpgroup_mma_wait(num_outstanding=0, deps=(dpt,)))
        _consumers_arrive(_DP_READY)
        _consumers_sync(_DS_READY)
    own = stage * 2 + WG  # this consumer's channels of the stage
    for half in gl.static_range(2):
        dv = warpgroup_mma(pt_s.index(half), do_s.index(own).slice(half * HALF, HALF), dv, is_async=True)
        gc = warpgroup_mma(dst_s.index(half), qc_s.index(own).slice(half * HALF, HALF), gc, is_async=True)
        gs = warpgroup_mma(dst_s.index(half), qs_s.index(own).slice(half * HALF, HALF), gs, is_async=True)
    dv, gc, gs = warpgroup_mma_wait(num_outstanding=0, deps=(dv, gc, gs))
    mbarrier.arrive(empty.index(stage), count=1)
    return dv, gc, gs


@gluon.jit
def _dkdv_tiles(t0, t1, dv, gc, gs, kc_own, ks_own, v_own, ones, handed, s_init, keys, n_k, qring, MASKED: gl.constexpr,
                CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                HALVES: gl.constexpr, WG: gl.constexpr):
    """Consumer WG's query tiles t0 .. t1-1: _dkdv_tile's with its own keys, or _dkdv_tile_shared's where the two
    consumers share their keys (HALVES = 2)."""
    for t in range(t0, t1):
        if HALVES == 1:
            dv, gc, gs = _dkdv_tile(t, dv, gc, gs, kc_own.index(WG), ks_own.index(WG), v_own.index(WG), ones, s_init,
                                    keys, n_k, qring, MASKED, CAUSAL, HEAD_DIM, BLOCK_M, STAGES)
        else:
            dv, gc, gs = _dkdv_tile_shared(t, dv, gc, gs, kc_own, ks_own, v_own, ones, handed, s_init, keys, n_k,
                                           qring, MASKED, CAUSAL, BLOCK_M, STAGES, WG)
    return dv, gc, gs


@gluon.jit
def _dkdv_consumer(qring, krows, CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                   STAGES: gl.constexpr, MASKED_APART: gl.constexpr, HALVES: gl.constexpr, WG: gl.constexpr):
    """Warpgroup WG's block of 64 keys by HEAD_DIM // HALVES channels (_dkdv_kernel) against the streamed query tiles:
    P^T and dS^T recomputed, dV = P^T dO, gc = dS^T qc and gs = dS^T qs accumulated; then dk = sigmoid(k) (cos gc +
    sin gs) ln2 and d delta as flash.py's dk/dv pass."""
    (K, MuK, V, DK, DV, DDelta, Delta, stride_kb, stride_kh, stride_kn, stride_mb, stride_mh, stride_vb, stride_vh,
     stride_vn, stride_gb, stride_gh, stride_gn, n_k, start_n, kc_own, ks_own, v_own, ones_own, handed) = krows
    _, _, _, _, Freqs, b, h, _, _, q_offset, _, _, _, _, lo, n_tiles, _, _, _, _, _, ready, empty, _ = qring
    dtype: gl.constexpr = DV.dtype.element_ty
    blocked: gl.constexpr = _BLOCKED
    CHANNELS: gl.constexpr = HEAD_DIM // HALVES
    s_mma: gl.constexpr = _wgmma_layout(BLOCK_M)
    o_mma: gl.constexpr = _wgmma_layout(CHANNELS)

    # this warpgroup's keys and values, stationary: kc, ks (built as flash.py's _polar does, from the backward
    # pre-pass's magnitudes mu_k: no softplus here) and V in shared memory; with two halves, its channels of the keys
    # both consumers share
    k0 = start_n + (64 * WG if HALVES == 1 else 0)
    c0 = 0 if HALVES == 1 else CHANNELS * WG
    freqs = Freqs + c0
    delta = Delta + h * HEAD_DIM + c0
    mu, cos, sin = _key_rows(MuK + c0, freqs, delta, b, h, stride_mb, stride_mh, HEAD_DIM, k0, n_k, CHANNELS, blocked)
    mu = mu.to(gl.float32)
    kc_own.index(WG).store((mu * cos).to(dtype))
    ks_own.index(WG).store((mu * sin).to(dtype))
    v_own.index(WG).store(_rows(V + c0, b, h, stride_vb, stride_vh, stride_vn, k0, n_k, CHANNELS, blocked))
    ones = ones_own.index(WG)  # the key side of the folded rows: ones in columns 0 and 1
    col = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, _FOLD)), 0)
    ones.store((gl.zeros([64, 16], gl.float32, _FOLD) + gl.where(col < 2, 1.0, 0.0)).to(dtype))
    fence_async_shared()
    if HALVES == 1:
        _barrier()
    else:  # each consumer's products read the other's half too
        _consumers_sync(_CONSUMERS_BARRIER)

    keys = k0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_mma))
    dv = gl.zeros([64, CHANNELS], gl.float32, o_mma)
    gc = gl.zeros([64, CHANNELS], gl.float32, o_mma)
    gs = gl.zeros([64, CHANNELS], gl.float32, o_mma)
    s_init = gl.zeros([64, BLOCK_M], gl.float32, s_mma)
    # The tiles before `first` are all before these keys (causal): released unread. Those from `first` to `unmasked`
    # hold the diagonal and need the mask, as every tile does if the block has padded keys (there P = exp2(0 - lse)
    # may be inf). If MASKED_APART the rest run without it, in a loop of their own; otherwise every tile is masked
    # (with the mask behind a branch, ptxas made it selects that every tile executed anyway: 50 of the loop's 241
    # instructions per tile at D = 64).
    first = (gl.maximum(k0 - q_offset, 0) // BLOCK_M * BLOCK_M - lo) // BLOCK_M if CAUSAL else 0
    if k0 + 64 > n_k or not MASKED_APART:
        unmasked = n_tiles
    elif CAUSAL:
        unmasked = gl.minimum(gl.maximum(gl.cdiv(gl.maximum(k0 + 63 - q_offset - lo, 0), BLOCK_M), first), n_tiles)
    else:
        unmasked = first
    for t in range(gl.minimum(first, n_tiles)):  # first > n_tiles: keys past every query (padding)
        mbarrier.wait(ready.index(t % STAGES), (t // STAGES) & 1)
        mbarrier.arrive(empty.index(t % STAGES), count=1)
    dv, gc, gs = _dkdv_tiles(first, unmasked, dv, gc, gs, kc_own, ks_own, v_own, ones, handed, s_init, keys, n_k,
                             qring, True, CAUSAL, HEAD_DIM, BLOCK_M, STAGES, HALVES, WG)
    dv, gc, gs = _dkdv_tiles(unmasked, n_tiles, dv, gc, gs, kc_own, ks_own, v_own, ones, handed, s_init, keys, n_k,
                             qring, False, CAUSAL, HEAD_DIM, BLOCK_M, STAGES, HALVES, WG)

    # gc, gs carry the queries' sm_scale log2(e); ln2 leaves sm_scale (flash.py's _polar_grad)
    k, cos, sin = _key_rows(K + c0, freqs, delta, b, h, stride_kb, stride_kh, stride_kn, k0, n_k, CHANNELS, o_mma)
    x = k.to(gl.float32)
    gc = gc * _LN2
    gs = gs * _LN2
    dk = (cos * gc + sin * gs) / (1.0 + gl.exp2(-x * _LOG2E))
    o_keys = k0 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_mma))
    o_d = gl.arange(0, CHANNELS, layout=gl.SliceLayout(0, o_mma))
    key_ok = gl.expand_dims(o_keys < n_k, 1)
    # softplus(k) in fp32 here, not mu_k (rounded to the input dtype): d delta's error against float64 grew up to 1.5x
    # with mu_k (benchmarks/attention_notes.md, session 14)
    ddelta = gl.where(key_ok, _softplus(x) * (gs * cos - gc * sin), 0.0)
    gl.atomic_add(DDelta + h * HEAD_DIM + c0 + o_d, gl.sum(ddelta, 0), sem="relaxed")
    _store_rows(DK + c0, b, h, stride_gb, stride_gh, stride_gn, k0, n_k, dk.to(dtype), CHANNELS)
    _store_rows(DV + c0, b, h, stride_gb, stride_gh, stride_gn, k0, n_k, dv.to(dtype), CHANNELS)


@gluon.jit
def _dkdv_kernel(MuQ, MuK, K, V, Freqs, Delta, DO, Lse, Dvec, DK, DV, DDelta,
                 stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                 stride_gb, stride_gh, stride_gn, n_heads, n_q, n_k, q_offset, qk_scale,
                 CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                 MASKED_APART: gl.constexpr, HALVES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                 PRODUCER_REGS: gl.constexpr):
    # HALVES = 1: each consumer owns 64 keys at every channel (128 keys a program). HALVES = 2 (D = 128, where dv, gc
    # and gs of 64 keys at every channel would take 192 registers a thread): both consumers take the same 64 keys,
    # each owning half the channels of dv, gc and gs; S^T and dP^T sum over both halves, whose buffers are
    # stage * HALVES + part, and are computed once, by one consumer each (_dkdv_tile_shared, channel_parts).
    dtype: gl.constexpr = V.dtype.element_ty
    CHANNELS: gl.constexpr = HEAD_DIM // HALVES
    bh = gl.program_id(1)
    # causal: the first key blocks are seen by the most queries, launched first
    start_n = gl.program_id(0) * (128 // HALVES)
    # query tiles that see keys start_n ..: from the one holding position start_n (causal) to the end
    lo = gl.maximum(start_n - q_offset, 0) // BLOCK_M * BLOCK_M if CAUSAL else 0
    n_tiles = gl.cdiv(gl.maximum(n_q - lo, 0), BLOCK_M)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, CHANNELS], dtype)
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, CHANNELS], dtype)
    qc_s = gl.allocate_shared_memory(dtype, [STAGES * HALVES, BLOCK_M, CHANNELS], q_layout)
    qs_s = gl.allocate_shared_memory(dtype, [STAGES * HALVES, BLOCK_M, CHANNELS], q_layout)
    do_s = gl.allocate_shared_memory(dtype, [STAGES * HALVES, BLOCK_M, CHANNELS], q_layout)
    folded_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 16], dtype)
    lse_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, 16], folded_layout)
    dvec_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, 16], folded_layout)
    ones_own = gl.allocate_shared_memory(dtype, [2, 64, 16], gl.NVMMASharedLayout.get_default_for([64, 16], dtype))
    kc_own = gl.allocate_shared_memory(dtype, [2, 64, CHANNELS], k_layout)  # by consumer: its keys or channels
    ks_own = gl.allocate_shared_memory(dtype, [2, 64, CHANNELS], k_layout)
    v_own = gl.allocate_shared_memory(dtype, [2, 64, CHANNELS], k_layout)
    if HALVES == 2:  # each tile's P^T, dS^T and dP^T, handed between the consumers (_dkdv_tile_shared)
        handed_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_M // 2], dtype)
        handed = (gl.allocate_shared_memory(dtype, [2, 64, BLOCK_M // 2], handed_layout),
                  gl.allocate_shared_memory(dtype, [2, 64, BLOCK_M // 2], handed_layout),
                  gl.allocate_shared_memory(gl.float32, [64, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])))
    else:
        handed = ones_own  # (unused)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # released by both consumers, read or skipped
    qring = (MuQ, DO, Lse, Dvec, Freqs, bh // n_heads, bh % n_heads, bh, n_q, q_offset, qk_scale, stride_dob,
             stride_doh, stride_don, lo, n_tiles, qc_s, qs_s, do_s, lse_s, dvec_s, ready, empty,
             gl.allocate_shared_memory(dtype, [2 * HALVES, BLOCK_M, CHANNELS], q_layout))  # mu_q's staging slots
    # mu_k is contiguous
    krows = (K, MuK, V, DK, DV, DDelta, Delta, stride_kb, stride_kh, stride_kn, n_heads * n_k * HEAD_DIM,
             n_k * HEAD_DIM, stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gn, n_k, start_n, kc_own,
             ks_own, v_own, ones_own, handed)
    gl.warp_specialize([(_dkdv_consumer, (qring, krows, CAUSAL, HEAD_DIM, BLOCK_M, STAGES, MASKED_APART, HALVES, 0)),
                        (_dkdv_consumer, (qring, krows, CAUSAL, HEAD_DIM, BLOCK_M, STAGES, MASKED_APART, HALVES, 1)),
                        (_query_producer, (qring, HEAD_DIM, BLOCK_M, STAGES, HALVES))],
                       [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


# ---------------------------------------------------------------------------------------------------------
# Launchers


def config(kernel: str, head_dim: int, n_k: int) -> Config:
    """The configuration of `kernel` at a head dim in CONFIGS for n_k keys."""
    long = LONG_CONFIGS.get((kernel, head_dim)) if n_k >= LONG_KEYS else None
    return long or CONFIGS[kernel, head_dim]


def launch_options(kernel: str, head_dim: int, n_k: int, fp16: bool = False) -> dict:
    """A kernel's constexprs and launch options for a head dim in CONFIGS, n_k keys and fp16 or bf16 inputs."""
    c = config(kernel, head_dim, n_k)
    if kernel == "dkdv":  # streams query tiles
        streamed = {"BLOCK_M": c.block_n, "MASKED_APART": c.masked_apart, "HALVES": channel_parts(kernel, head_dim)}
    else:  # streams key tiles
        streamed = {"BLOCK_N": c.block_n, "BUILD_ROWS": c.build_rows or c.block_n, "STAGED_MU": c.staged_mu}
        if kernel == "dq":
            streamed["HALVES"] = channel_parts(kernel, head_dim)
    consumer_regs, producer_regs = (c.fp16_regs if fp16 and c.fp16_regs else (c.consumer_regs, c.producer_regs))
    return {"HEAD_DIM": head_dim, **streamed, "STAGES": c.stages,
            "CONSUMER_REGS": consumer_regs, "PRODUCER_REGS": producer_regs, "num_warps": 4, "maxnreg": _MAXNREG}


def channel_parts(kernel: str, head_dim: int) -> int:
    """Into how many parts the consumers of `kernel` split the channels: 2 in the backward passes at D = 128, where
    both consumers then take the same 64 rows (dq pass) or keys (dk/dv), each half the channels (HALVES in _dq_kernel,
    _dkdv_kernel); else 1, each consumer its own 64 at every channel."""
    return 2 if kernel != "fwd" and head_dim > 64 else 1


def _schedule(kernel: str, q: torch.Tensor, v: torch.Tensor, causal: bool,
              q_offset: int) -> tuple[tuple[int], int, torch.Tensor, int]:
    """The forward's or the dq pass's grid, order of work (_work), and the listed order's table and rounds.

    The order: snaking where the keys and values of all heads fit in L2 (KEYS_IN_L2 of it), else listed where
    work_order.choose says so, else paired. One program per SM (only one fits, by its registers) if the configuration
    is persistent and there are more units of work, else one per unit. In the orders without a table the kernel gets
    q there, unread, and 0 rounds (an int 0 for the table made ptxas spill 2 in the D = 128 dq pass)."""
    batch, heads, n_q, head_dim = q.shape
    n_k = v.shape[2]
    rows = BLOCK_M // channel_parts(kernel, head_dim)
    blocks = triton.cdiv(n_q, rows)
    properties = _properties(q.device.index)
    c = config(kernel, head_dim, n_k)
    keys_bytes = 2 * v.numel() * v.element_size()
    l2_budget = KEYS_IN_L2 * properties.L2_cache_size
    order, listed = work_order.SNAKING, None
    if keys_bytes > l2_budget:
        order = work_order.PAIRED
        programs = min(batch * heads * blocks, properties.multi_processor_count)
        key = (q.device.index, batch * heads, blocks, rows, n_k, q_offset, causal, c.block_n, programs,
               keys_bytes // (batch * heads), l2_budget)
        if c.persistent and (key in _LISTED_TABLES or not torch.cuda.is_current_stream_capturing()):
            listed = _listed_table(key)
    if listed is not None:
        return (listed.shape[1],), work_order.LISTED, listed, listed.shape[0]
    units = batch * heads * (triton.cdiv(blocks, 2) if order == work_order.PAIRED else blocks)
    return (min(units, properties.multi_processor_count) if c.persistent else units,), order, q, 0


# The listed order's tables by launch (_listed_table's key), kept for the process: a few KiB each, and a CUDA
# graph that replays a launch reads its table there. A shape first met while a graph is being captured takes the
# paired order instead (_schedule), since the host cannot copy a table to the GPU then.
_LISTED_TABLES: dict[tuple, torch.Tensor | None] = {}


def _listed_table(key: tuple) -> torch.Tensor | None:
    """work_order.choose's table (rounds, programs), int32 on the GPU, for key = (device index, choose's arguments up
    to min_gain); None where it chose the paired order.

    Copied to the GPU by a thread of its own: while torch.compile's CUDA graphs (mode reduce-overhead) warm up, the
    warming thread's allocations come from the graphs' memory pool, and a cached tensor left alive there stops the
    run at its first call ("tensor(s) in the cudagraph pool not tracked as outputs": the 124m recipe, session 36).
    Another thread's come from the ordinary pool."""
    if key not in _LISTED_TABLES:
        order, table = work_order.choose(*key[1:], LISTED_GAIN)
        _LISTED_TABLES[key] = None
        if order == work_order.LISTED:
            with ThreadPoolExecutor(max_workers=1) as copier:
                _LISTED_TABLES[key] = copier.submit(_on_gpu, table, key[0]).result()
    return _LISTED_TABLES[key]


def _on_gpu(table: list[list[int]], device_index: int) -> torch.Tensor:
    tensor = torch.tensor(table, dtype=torch.int32, device=torch.device("cuda", device_index))
    torch.cuda.current_stream(device_index).synchronize()  # copied before any launch on another stream reads it
    return tensor


@functools.cache
def _properties(device_index: int) -> torch.cuda._CudaDeviceProperties:
    return torch.cuda.get_device_properties(device_index)


def forward(q: torch.Tensor, mu_k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor, delta: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, causal: bool, qk_scale: float, q_offset: int) -> None:
    """flash.py's forward from the keys' prepass on: q, v (B, H, N, D) with unit last stride, mu_k (B, H, Nk, D)
    contiguous, delta (H, D) contiguous; writes out (B, H, Nq, D), unit last stride, and lse (B, H, Nq), log2 units,
    as flash.py's."""
    batch, heads, n_q, head_dim = q.shape
    grid, order, listed, listed_rounds = _schedule("fwd", q, v, causal, q_offset)
    _fwd_kernel[grid](
        q, mu_k, v, freqs, delta, out, lse, listed, *q.stride()[:3], *v.stride()[:3], *out.stride()[:3], heads,
        batch * heads, n_q, v.shape[2], q_offset, listed_rounds, qk_scale, CAUSAL=causal, ORDER=order,
        **launch_options("fwd", head_dim, v.shape[2], q.dtype == torch.float16))


def dq_pass(q: torch.Tensor, mu_q: torch.Tensor, mu_k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor,
            delta: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, dvec: torch.Tensor,
            dq: torch.Tensor, causal: bool, sm_scale: float, q_offset: int) -> None:
    """flash.py's dq pass: as `forward`'s inputs, plus mu_q = softplus(q) (B, H, Nq, D) contiguous from the backward's
    prepass, out and dout (unit last stride) and lse (B, H, Nq); writes dvec = rowsum(dout * out) (B, H, Nq)
    contiguous, which the dk/dv pass reads, and dq (B, H, Nq, D, unit last stride)."""
    batch, heads, n_q, head_dim = q.shape
    grid, order, listed, listed_rounds = _schedule("dq", q, v, causal, q_offset)
    _dq_kernel[grid](
        q, mu_q, mu_k, v, freqs, delta, out, dout, lse, dvec, dq, listed, *q.stride()[:3], *v.stride()[:3],
        *out.stride()[:3], *dout.stride()[:3], *dq.stride()[:3], heads, batch * heads, n_q, v.shape[2], q_offset,
        listed_rounds, sm_scale, sm_scale * math.log2(math.e), CAUSAL=causal, ORDER=order,
        **launch_options("dq", head_dim, v.shape[2], q.dtype == torch.float16))


def dkdv_pass(mu_q: torch.Tensor, mu_k: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor,
              delta: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, dvec: torch.Tensor, dk: torch.Tensor,
              dv: torch.Tensor, ddelta: torch.Tensor, causal: bool, qk_scale: float, q_offset: int) -> None:
    """flash.py's dk/dv pass (split dq): mu_q = softplus(q) (B, H, Nq, D) and mu_k = softplus(k) (B, H, Nk, D)
    contiguous from the prepasses, k, v, dout with unit last stride, lse and dvec (B, H, Nq); writes dk, dv (B, H, Nk,
    D; unit last stride, the same strides) and adds d delta to ddelta (H, D) fp32, which must start at zero."""
    batch, heads, n_k, head_dim = k.shape
    _dkdv_kernel[(triton.cdiv(n_k, 128 // channel_parts("dkdv", head_dim)), batch * heads)](
        mu_q, mu_k, k, v, freqs, delta, dout, lse, dvec, dk, dv, ddelta, *k.stride()[:3], *v.stride()[:3],
        *dout.stride()[:3], *dk.stride()[:3], heads, mu_q.shape[2], n_k, q_offset, qk_scale, CAUSAL=causal,
        **launch_options("dkdv", head_dim, n_k, k.dtype == torch.float16))
