"""The PoPE flash-attention Triton kernels against the float64 reference, on CPU through Triton's interpreter.

Triton chooses between compiling and interpreting when the process first imports it; tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton.
"""

import math
import sys

import pytest
import torch

from pope_lm.kernels import flash, pope_attention, pope_attention_reference
from pope_lm.kernels.reference import pope_frequencies

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


def _check_against_reference(q, k, v, delta, dout, **kwargs) -> None:
    """Output and the gradients of q, k, v, delta within the dtype's tolerance of the float64 reference."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, delta)]
    out = pope_attention(*leaves, **kwargs)
    out.backward(dout)
    refs = [x.detach().double().requires_grad_() for x in (q, k, v, delta)]
    ref = pope_attention_reference(*refs, **kwargs)
    ref.backward(dout.double())

    assert out.dtype == q.dtype and out.shape == ref.shape
    tol = TOL[q.dtype]
    errors = {"out": _rel_err(out, ref)}
    names = ["q", "k", "v", "delta"]
    errors.update({name: _rel_err(x.grad, r.grad) for name, x, r in zip(names, leaves, refs, strict=True)})
    assert all(e < tol for e in errors.values()), errors


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


@pytest.fixture(params=["fused dq", "split dq"])
def dq_path(request, monkeypatch):
    """Both backward structures, forced: dq by atomics inside the dk/dv pass, and the separate dq pass."""
    fused = request.param == "fused dq"
    monkeypatch.setattr(flash, "FUSED_DQ_HEAD_DIMS", frozenset(flash.HEAD_DIMS))
    monkeypatch.setattr(flash, "FUSED_DQ_MAX_KEYS", sys.maxsize if fused else 0)
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
