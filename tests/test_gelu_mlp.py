"""The MLP with GELU in cuBLASLt's epilogues (`pope_lm.kernels.gelu_mlp`): on the CPU its custom ops run the same
function in torch, which pins the autograd wiring and torch.compile's view of it; on the GPU
`benchmarks/gelu_epilogue.py` checks cuBLASLt's own outputs against torch."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pope_lm.config import ModelConfig
from pope_lm.kernels.gelu_mlp import gelu_mlp
from pope_lm.model import MLP


def _torch_mlp(x, up, down):
    return F.linear(F.gelu(F.linear(x, up), approximate="tanh"), down)


def _operands(dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    up = torch.randn(64, 16, dtype=dtype, requires_grad=True)
    down = torch.randn(16, 64, dtype=dtype, requires_grad=True)
    return x, up, down


@pytest.mark.parametrize("compiled", [False, True])
def test_output_and_all_three_gradients_equal_the_torch_mlp(compiled):
    x, up, down = _operands()
    dy = torch.randn(2, 5, 16, dtype=torch.float64)
    fn = torch.compile(gelu_mlp, fullgraph=True, backend="aot_eager") if compiled else gelu_mlp
    y = fn(x, up, down)
    expected = _torch_mlp(x, up, down)
    torch.testing.assert_close(y, expected)
    for got, want in zip(torch.autograd.grad(y, (x, up, down), dy),
                         torch.autograd.grad(expected, (x, up, down), dy), strict=True):
        torch.testing.assert_close(got, want)


def test_under_autocast_it_computes_in_the_autocast_dtype_and_returns_fp32_weight_gradients():
    x, up, down = _operands(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gelu_mlp(x, up, down)
        expected = _torch_mlp(x, up, down)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert up.grad.dtype == down.grad.dtype == x.grad.dtype == torch.float32


@pytest.mark.parametrize(("activation", "approximate"), [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_model_mlp_applies_the_configured_gelu(activation, approximate):
    mlp = MLP(ModelConfig(d_model=16, activation=activation))
    x = torch.randn(3, 16)
    torch.testing.assert_close(mlp(x), mlp.down(F.gelu(mlp.up(x), approximate=approximate)))
    assert (mlp.fused is not None) == (activation == "gelu_tanh")


def test_where_cublaslt_has_no_algorithm_the_same_function_runs_in_torch(monkeypatch):
    from pope_lm.kernels import gelu_mlp as module

    monkeypatch.setattr(module, "fused", lambda x, weight: True)
    monkeypatch.setattr(module, "_matmul", lambda *args, **kwargs: False)  # as for a shape without an algorithm
    x, up, down = _operands()
    y = gelu_mlp(x, up, down)
    expected = _torch_mlp(x, up, down)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, up, down), dy),
                         torch.autograd.grad(expected, (x, up, down), dy), strict=True):
        torch.testing.assert_close(got, want)


class _RecordingCublasLt:
    """Stands in for cuBLASLt's two per-call entry points: remembers the auxiliary pointer last set on each descriptor
    (then pauses, as a thread switch before the launch could) and, at each launch, which one it uses for which
    output."""

    def __init__(self):
        self.aux_of_descriptor, self.launches = {}, []

    def cublasLtMatmulDescSetAttribute(self, desc, attribute, value, size):
        self.aux_of_descriptor[desc] = value._obj.value
        time.sleep(0.001)
        return 0

    def cublasLtMatmul(self, handle, desc, alpha, a, a_layout, b, b_layout, beta, c, c_layout, d, *rest):
        self.launches.append((self.aux_of_descriptor[desc], d.value))
        return 0


def test_concurrent_calls_of_one_shape_each_launch_with_their_own_auxiliary_matrix(monkeypatch):
    # every call of a shape shares the plan's descriptor and sets its own aux pointer on it just before the launch
    from pope_lm.kernels import gelu_mlp as module

    library = _RecordingCublasLt()
    monkeypatch.setattr(module, "_lt", lambda: library)
    monkeypatch.setattr(module, "_handle_and_workspace", lambda index: (None, None))
    monkeypatch.setattr(module, "_make_context_current", lambda: None)
    monkeypatch.setattr(module, "_plan", lambda *args: ("descriptor", (None, None, None), module._HeuristicResult()))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=0))
    # no cuBLASLt arithmetic happens: the operands' addresses are all these stand-ins are for
    calls = [tuple(torch.empty(16, 8) for _ in range(4)) for _ in range(8)]

    errors = []

    def launch(a, b, aux, out):
        try:
            module._matmul(a, b, aux, out, transpose_a=True, epilogue=module._EPILOGUE_GELU_AUX)
        except Exception as error:  # a thread's exception would otherwise pass unseen
            errors.append(error)

    threads = [threading.Thread(target=launch, args=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(library.launches) == sorted((aux.data_ptr(), out.data_ptr()) for _, _, aux, out in calls)
