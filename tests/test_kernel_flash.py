"""The PoPE flash-attention Triton kernels against the float64 reference, on CPU through Triton's interpreter.

Triton chooses between compiling and interpreting when the process first imports it; tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pope_lm.kernels import flash, pope_attention, pope_attention_packed, pope_attention_reference
from pope_lm.kernels.reference import pope_frequencies, pope_scores

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _inputs(b, h, n_q, n_k, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g).to(dtype)
    k = torch.randn(b, h, n_k, d, generator=g).to(dtype)
    v = torch.randn(b, h, n_k, d, generator=g).to(dtype)
    delta = -2 * math.pi * torch.rand(h, d, generator=g)
    dout = torch.randn(b, h, n_q, d, generator=g).to(dtype)
    return q, k, v, delta, dout


def _errors(attention, q, k, v, delta, dout, **kwargs) -> dict[str, float]:
    """Relative errors of `attention`'s output and gradients of q, k, v, delta against the float64 reference."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, delta)]
    out = attention(*leaves, **kwargs)
    out.backward(dout)
    refs = [x.detach().double().requires_grad_() for x in (q, k, v, delta)]
    ref = pope_attention_reference(*refs, **kwargs)
    ref.backward(dout.double())

    assert out.dtype == q.dtype and out.shape == ref.shape
    errors = {"out": _rel_err(out, ref)}
    names = ["q", "k", "v", "delta"]
    errors.update({name: _rel_err(x.grad, r.grad) for name, x, r in zip(names, leaves, refs, strict=True)})
    return errors


def _check_against_reference(q, k, v, delta, dout, **kwargs) -> None:
    """Output and the gradients of q, k, v, delta within the dtype's tolerance of the float64 reference."""
    errors = _errors(pope_attention, q, k, v, delta, dout, **kwargs)
    assert all(e < TOL[q.dtype] for e in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_self_attention_odd_length_matches_reference(dtype, causal):
    _check_against_reference(*_inputs(2, 2, 37, 37, 32, dtype), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_more_keys_than_queries_non_causal_matches_reference(dtype):
    _check_against_reference(*_inputs(1, 2, 29, 45, 64, dtype, seed=1), causal=False)


@pytest.mark.parametrize(("n_q", "n_k", "q_offset"), [(7, 50, 43), (20, 40, 20), (1, 33, 32), (9, 9, 40)])
def test_causal_with_query_offset_matches_reference(n_q, n_k, q_offset):
    # decoding with a cache (q_offset = Nk - Nq), a chunk of a prefill, one token, queries past all keys
    _check_against_reference(*_inputs(1, 2, n_q, n_k, 64, torch.float32, seed=2), causal=True,
                             q_offset=q_offset)


def _force_dq_path(monkeypatch, path: str) -> None:
    """'fused dq': dq by atomics inside the dk/dv pass at every shape; 'split dq': the separate dq pass."""
    monkeypatch.setattr(flash, "FUSED_DQ_HEAD_DIMS", frozenset(flash.HEAD_DIMS))
    monkeypatch.setattr(flash, "FUSED_DQ_MAX_KEYS", sys.maxsize if path == "fused dq" else 0)


@pytest.fixture(params=["fused dq", "split dq"])
def dq_path(request, monkeypatch):
    """Both backward structures, forced: dq by atomics inside the dk/dv pass, and the separate dq pass."""
    _force_dq_path(monkeypatch, request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n_q", "n_k", "q_offset", "causal"),
                         [(37, 37, 0, True), (29, 45, 0, False), (7, 50, 43, True), (20, 41, 21, True),
                          (9, 9, 40, True)])
def test_both_dq_paths_match_reference(dq_path, dtype, n_q, n_k, q_offset, causal):
    # odd lengths (partial query and key tiles on both sides of the atomics), q_offset, queries past all keys
    _check_against_reference(*_inputs(2, 2, n_q, n_k, 32, dtype, seed=8), causal=causal, q_offset=q_offset)


def test_both_dq_paths_head_dim_128(dq_path):
    _check_against_reference(*_inputs(1, 2, 19, 19, 128, torch.float16, seed=9), causal=True)


def _gpu_tiles(name: str) -> list[tuple[int, int]]:
    """The distinct (BLOCK_M, BLOCK_N) among the GPU's autotuning candidates of a pass for head dim 64 (and 32), for
    fp16/bf16 and for fp32 inputs."""
    tables = (flash._BLOCKS, flash._FP32_BLOCKS)
    return list(dict.fromkeys((m, n) for table in tables for m, n, _, _ in table[name][64]))


@pytest.mark.parametrize("name", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_fp32_inputs_autotune_over_their_own_tiles(name, head_dim):
    # bf16's tiles spill 7-27 KB a thread with fp32 operands, and CUDA keeps that much local memory for every thread
    # of the card for the rest of the process once one of them has run, even as an autotuning trial
    tuned = {"fwd": flash._fwd_tuned, "dq": flash._dq_tuned, "dkdv": flash._dkdv_tuned}[name]
    for precision, table in (("ieee", flash._FP32_BLOCKS), ("tf32", flash._BLOCKS)):
        kept = tuned.early_config_prune(tuned.configs, {}, HEAD_DIM=head_dim, DOT_PRECISION=precision, FUSED_DQ=False)
        tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
        assert tiles == table[name][max(64, head_dim)]


def _gpu_tile_sets() -> list:
    """(dq path, interpreter blocks) pairs that together run every GPU tile shape of every pass at D = 64.

    Set i gives each pass the i-th distinct shape of its list (cycling through shorter lists); the dk/dv pass
    takes "dkdv_dq"'s list on the fused dq path. Under the interpreter `_launch` reads `_INTERPRETER_BLOCKS`
    only, so without this the CPU tests never see a key block larger than the sequence (BLOCK_N = 128) or 4 to
    8 query blocks per key block.
    """
    sets = []
    for path, dkdv in (("fused dq", "dkdv_dq"), ("split dq", "dkdv")):
        tiles = {"fwd": _gpu_tiles("fwd"), "dq": _gpu_tiles("dq"), "dkdv": _gpu_tiles(dkdv)}
        used = [name for name in tiles if name != "dq" or path == "split dq"]
        for i in range(max(len(tiles[name]) for name in used)):
            blocks = {name: shapes[i % len(shapes)] for name, shapes in tiles.items()}
            label = " ".join(f"{name} {blocks[name][0]}x{blocks[name][1]}" for name in used)
            sets.append(pytest.param(path, blocks, id=f"{path}, {label}"))
    return sets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [64, 100])
@pytest.mark.parametrize(("path", "blocks"), _gpu_tile_sets())
def test_every_gpu_tile_shape_matches_the_reference_at_short_and_odd_lengths(monkeypatch, path, blocks, n, causal,
                                                                               dtype):
    # n = 64: the sequence of the short-context experiment, smaller than a 128-key block; 100: partial tiles
    _force_dq_path(monkeypatch, path)
    monkeypatch.setattr(flash, "_INTERPRETER_BLOCKS", blocks)
    _check_against_reference(*_inputs(2, 2, n, n, 64, dtype, seed=n), causal=causal)


SHARP_SCALE = 16  # a power of two: q and k scale exactly in fp16


def _sharp_inputs(dtype, n=64, seed=11):
    """q and k scaled up: the largest logits in the hundreds and one key dominating each query, as in a trained
    model whose logits have grown."""
    q, k, v, delta, dout = _inputs(2, 2, n, n, 64, dtype, seed=seed)
    return SHARP_SCALE * q, SHARP_SCALE * k, v, delta, dout


# exp2 of masked-out scores (keys after the query, padded keys) may overflow before tl.where drops them
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("path", "blocks"), _gpu_tile_sets())
def test_sharp_softmax_with_logits_in_the_hundreds_is_as_accurate_as_the_reference(monkeypatch, path, blocks,
                                                                                     causal, dtype):
    """With logits L in the hundreds, rounding moves scores by ~L eps, so every backend loses accuracy; the kernel
    must lose no more than the plain-torch backend does in the same dtype. That holds only if the backward
    recomputes P from the very halves the forward rounded: the dk/dv pass's own rounding (scale on the key side,
    the queries' mu rounded twice) gave fp16 errors near 5e-2 here in dv (26x the plain-torch backend's), dk,
    d delta and the fused dq (2-4x)."""
    _force_dq_path(monkeypatch, path)
    monkeypatch.setattr(flash, "_INTERPRETER_BLOCKS", blocks)
    q, k, v, delta, dout = _sharp_inputs(dtype)
    logits = pope_scores(q.double(), k.double(), delta.double())
    top2 = logits.topk(2, dim=-1).values
    assert logits.max() > 200 and (top2[..., 0] - top2[..., 1]).median() > 10  # sharp, as intended

    kernel = _errors(pope_attention, q, k, v, delta, dout, causal=causal)
    torch_same_dtype = _errors(pope_attention_reference, q, k, v, delta, dout, causal=causal)
    # the backward's fp32 scores come from phases advanced by angle addition rather than computed directly, and are
    # summed in another order: they differ from the forward's by a few fp32 eps of |S| in any dtype (torch's
    # backward recomputes its scores from the same tensors in the same way)
    slack = 4 * torch.finfo(torch.float32).eps * logits.abs().max().item()
    assert all(kernel[x] < 2 * torch_same_dtype[x] + slack for x in kernel), (kernel, torch_same_dtype)


def _very_negative_inputs(n_q, n_k, seed=12):
    """Every logit near -180, so that each query's log2-sum-exp is below -128 and 2^-lse overflows fp32: q and k
    large (softplus ~10) only in the 16 lowest-frequency channels, where the phase bias delta = pi turns
    cos((s - t) theta + delta) to about -1 at every position; elsewhere softplus(-30) ~ 1e-13."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.full((1, 2, n_q, 64), -30.0), torch.full((1, 2, n_k, 64), -30.0)
    q[..., 48:] = 10 + torch.randn(1, 2, n_q, 16, generator=g)
    k[..., 48:] = 10 + torch.randn(1, 2, n_k, 16, generator=g)
    v, dout = torch.randn(1, 2, n_k, 64, generator=g), torch.randn(1, 2, n_q, 64, generator=g)
    return q, k, v, torch.full((2, 64), math.pi), dout


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize(("n_q", "n_k", "q_offset", "causal"), [(64, 64, 0, False), (9, 37, 40, True)])
@pytest.mark.parametrize(("path", "blocks"), _gpu_tile_sets())
def test_padded_keys_add_nothing_where_every_logit_of_a_query_is_very_negative(monkeypatch, path, blocks, n_q, n_k,
                                                                                q_offset, causal):
    """Padded keys (past n_k in the last key block: all of 64..127 in a 128-key block at n = 64) must be masked
    wherever queries see a whole key block (non-causal, or queries past all keys): their score is 0, and
    2^(0 - lse) overflowed to inf, which times their kc = 0 made the fused dq NaN."""
    _force_dq_path(monkeypatch, path)
    monkeypatch.setattr(flash, "_INTERPRETER_BLOCKS", blocks)
    q, k, v, delta, dout = _very_negative_inputs(n_q, n_k)
    assert pope_scores(q.double(), k.double(), delta.double(), q_offset=q_offset).max() < -100
    errors = _errors(pope_attention, q, k, v, delta, dout, causal=causal, q_offset=q_offset)
    # fp32 scores near -250 in log2 units are recomputed to ~1e-5 of themselves: gradients to ~1e-4
    assert all(e < 1e-3 for e in errors.values()), errors


def test_head_dim_128_matches_reference():
    _check_against_reference(*_inputs(1, 1, 24, 24, 128, torch.float16, seed=3), causal=True)


def test_custom_scale_and_theta_match_reference():
    _check_against_reference(*_inputs(1, 2, 33, 33, 32, torch.float32, seed=4), causal=True, sm_scale=0.3,
                             theta=500.0)


def test_strided_inputs_and_expanded_gradient_match_reference():
    # (B, N, H, D) projections viewed as (B, H, N, D), and the stride-0 gradient that sum() hands back
    q, k, v, delta, _ = _inputs(2, 3, 21, 21, 32, torch.float32, seed=5)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    _check_against_reference(q, k, v, delta, torch.ones(2, 3, 21, 32).expand(2, 3, 21, 32), causal=True)


def test_output_is_laid_out_by_position_so_that_merging_heads_copies_nothing():
    # the model merges heads with out.transpose(1, 2).reshape(B, N, H * D), and its gradient hands dout back as the
    # same (B, N, H, D)-ordered view
    q, k, v, delta, dout = _inputs(2, 3, 21, 21, 32, torch.float32, seed=8)
    out = pope_attention(q, k, v, delta)
    assert out.transpose(1, 2).is_contiguous()
    _check_against_reference(q, k, v, delta, dout.transpose(1, 2).contiguous().transpose(1, 2), causal=True)


def test_packed_projection_matches_reference_and_returns_its_gradient_in_one_tensor():
    b, n, h, d = 2, 21, 3, 32
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(b, n, 3, h, d, generator=g, requires_grad=True)
    delta = (-2 * math.pi * torch.rand(h, d, generator=g)).requires_grad_()
    dout = torch.randn(b, h, n, d, generator=g)
    out = pope_attention_packed(qkv, delta)
    out.backward(dout)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref_delta = delta.detach().double().requires_grad_()
    ref = pope_attention_reference(*ref_qkv.permute(2, 0, 3, 1, 4), ref_delta)
    ref.backward(dout.double())
    assert _rel_err(out, ref) < TOL[torch.float32]
    assert qkv.grad.is_contiguous() and _rel_err(qkv.grad, ref_qkv.grad) < TOL[torch.float32]
    assert _rel_err(delta.grad, ref_delta.grad) < TOL[torch.float32]


def test_packed_projection_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, D\)"):
        pope_attention_packed(torch.randn(2, 8, 2, 2, 32), torch.zeros(2, 32))


def test_compiles_without_graph_break():
    q, k, v, delta, _ = _inputs(1, 2, 20, 20, 32, torch.float32, seed=6)
    delta.requires_grad_()

    def loss(delta):
        return pope_attention(q, k, v, delta).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(delta), delta)
    (ref_grad,) = torch.autograd.grad(pope_attention_reference(q, k, v, delta).square().sum(), delta)
    assert _rel_err(grad, ref_grad.double()) < TOL[torch.float32]


def test_custom_ops_pass_opcheck():
    q, k, v, delta, dout = _inputs(1, 2, 19, 19, 32, torch.float32, seed=7)
    freqs = pope_frequencies(32, 10000.0)
    fwd_args = (q.requires_grad_(), k, v, delta, freqs, True, 0.2, 0)
    torch.library.opcheck(torch.ops.pope_lm.pope_attention_fwd.default, fwd_args)
    out, lse = torch.ops.pope_lm.pope_attention_fwd(*fwd_args)
    bwd_args = (dout, q.detach(), k, v, delta, freqs, out.detach(), lse, True, 0.2, 0)
    torch.library.opcheck(torch.ops.pope_lm.pope_attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    qkv = torch.stack((q.detach(), k, v)).permute(1, 3, 0, 2, 4).contiguous().requires_grad_()  # (B, N, 3, H, D)
    packed_args = (qkv, delta, freqs, True, 0.2)
    torch.library.opcheck(torch.ops.pope_lm.pope_attention_packed_fwd.default, packed_args)
    out, lse = torch.ops.pope_lm.pope_attention_packed_fwd(*packed_args)
    torch.library.opcheck(torch.ops.pope_lm.pope_attention_packed_bwd.default,
                          (dout, qkv.detach(), delta, freqs, out.detach(), lse, True, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(flash, "_INTERPRETED", False)
    q, k, v, delta, _ = _inputs(1, 1, 8, 8, 32, torch.float32)
    # Called below the custom op: the op keeps the function of the first import of flash, and a test that
    # re-imports pope_lm (the export tests do) would leave this patch on a different module object.
    with pytest.raises(RuntimeError, match="CUDA"):
        flash._forward(q, k, v, delta, pope_frequencies(32), True, 0.2, 0)


def test_unsupported_head_dim_is_rejected():
    with pytest.raises(ValueError, match="head dims"):
        pope_attention(*_inputs(1, 1, 8, 8, 48, torch.float32)[:4])



def test_kernels_run_in_the_interpreter_on_cpu():
    assert flash._INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)"


def test_the_kernels_folder_imported_as_a_top_level_package_registers_no_ops_again():
    # From the repository root the folder is also the top-level package `kernels`, which transformers imports when it
    # probes for Hugging Face's kernel hub; running flash.py again there would re-register the custom ops
    code = ("import sys, pope_lm.kernels; from transformers import PreTrainedModel; "
            "print(sorted(m for m in sys.modules if m == 'kernels' or m.startswith('kernels.')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         check=True)
    imported = run.stdout.strip()
    if imported == "[]":
        pytest.skip("this transformers does not import `kernels` from the working directory")
    assert imported == "['kernels']"
