"""The head's fused cross-entropy (kernels/cross_entropy.py) against torch in float64, on CPU through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pope_lm.config import ModelConfig
from pope_lm.kernels import cross_entropy
from pope_lm.kernels.cross_entropy import linear_cross_entropy
from pope_lm.model import GPT

IGNORE = -100


def _inputs(rows: int, d: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    return x, weight, targets


def _loss_and_grads(loss_fn, x, weight, targets, dtype):
    x, weight = (t.detach().to(dtype).requires_grad_() for t in (x, weight))
    loss = loss_fn(x, weight, targets)
    loss.backward()
    return loss.detach().double(), x.grad.double(), weight.grad.double()


def _reference(x, weight, targets):
    return F.cross_entropy(x @ weight.t(), targets, ignore_index=IGNORE)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("block", [128, 4096])  # several chunks per row, the last one partial; or one chunk
def test_loss_and_gradients_match_float64(dtype, tol, block, monkeypatch):
    monkeypatch.setattr(cross_entropy, "_BLOCK", block)
    x, weight, targets = _inputs(rows=9, d=24, vocab=1000)
    targets[[2, 7]] = IGNORE
    got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, fused=True), x, weight, targets, dtype)
    ref = _loss_and_grads(_reference, x, weight, targets, torch.float64)
    for name, a, b in zip(("loss", "dx", "dweight"), got, ref, strict=True):
        assert ((a - b).norm() / b.norm()).item() < tol, name


def test_ignored_rows_get_no_gradient():
    x, weight, targets = _inputs(rows=5, d=8, vocab=70)
    targets[1] = IGNORE
    x = x.float().requires_grad_()
    linear_cross_entropy(x, weight.float(), targets, fused=True).backward()
    assert torch.all(x.grad[1] == 0)
    assert torch.all(x.grad[0] != 0)


def test_a_target_outside_the_vocabulary_makes_the_loss_nan():
    x, weight, targets = _inputs(rows=4, d=8, vocab=70)
    targets[3] = 70
    assert linear_cross_entropy(x.float(), weight.float(), targets, fused=True).isnan()


def test_without_grad_the_loss_is_the_same_and_the_logits_stay_logits():
    x, weight, targets = _inputs(rows=6, d=8, vocab=300)
    x, weight = x.float(), weight.float()
    with_grad = linear_cross_entropy(x.requires_grad_(), weight, targets, fused=True)
    with torch.no_grad():
        without = linear_cross_entropy(x, weight, targets, fused=True)
        _, logits = cross_entropy._loss_op(x, weight, targets, IGNORE, False)
    assert torch.allclose(with_grad.detach(), without)
    assert torch.allclose(logits, x @ weight.t())


def test_rejects_mismatched_shapes():
    x, weight, targets = _inputs(rows=4, d=8, vocab=70)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(x, weight, targets[:3])


def test_compiles_without_graph_break_under_autocast():
    x, weight, targets = _inputs(rows=4, d=8, vocab=70)
    x, weight = x.float(), weight.float().requires_grad_()

    def loss(w):
        with torch.autocast("cpu", dtype=torch.float16):  # the product and the kernel run in fp16, as F.linear would
            return linear_cross_entropy(x, w, targets, fused=True)

    (grad,) = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(weight), weight)
    (expected,) = torch.autograd.grad(_reference(x.double(), weight.double(), targets), weight)
    assert grad.dtype == torch.float32
    assert ((grad - expected).norm() / expected.norm()).item() < 2e-3


def test_model_loss_is_the_cross_entropy_of_its_logits():
    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2, head_dim=8, vocab_size=100, attention_backend="reference")
    model = GPT(cfg)
    idx = torch.randint(0, 100, (2, 6))
    targets = torch.randint(0, 100, (2, 6))
    logits = model(idx)
    assert torch.allclose(model(idx, targets), F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
