"""PoPE and RoPE attention equal direct evaluations of their score formulas (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pope_lm.config import ModelConfig
from pope_lm.kernels import pope_attention_reference
from pope_lm.position import AUTO_REFERENCE_MAX_KEYS, PoPE, RoPE, build_position, use_triton


def direct_pope_scores(q, k, delta, theta, q_offset):
    """a[b,h,i,j] = sum_c softplus(q) softplus(k) cos((s - t) theta_c + delta_hc), written out element-wise."""
    d = q.shape[-1]
    freqs = theta ** (-torch.arange(d, dtype=torch.float64) / d)
    t = torch.arange(q.shape[2], dtype=torch.float64) + q_offset
    s = torch.arange(k.shape[2], dtype=torch.float64)
    angle = (s[None, :, None] - t[:, None, None]) * freqs + delta[:, None, None, :]  # (H, Nq, Nk, D)
    mag = F.softplus(q)[:, :, :, None, :] * F.softplus(k)[:, :, None, :, :]  # (B, H, Nq, Nk, D)
    return (mag * torch.cos(angle)).sum(-1)


def attention_from_scores(scores, v, q_offset, scale):
    n_q, n_k = scores.shape[-2:]
    allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + q_offset
    weights = torch.softmax((scores * scale).masked_fill(~allowed, -math.inf), dim=-1)
    return weights @ v


@pytest.mark.parametrize(("n_q", "n_k", "q_offset"), [(7, 7, 0), (3, 9, 6), (1, 5, 4)])
def test_pope_reference_equals_direct_score_formula(n_q, n_k, q_offset):
    torch.manual_seed(0)
    b, h, d = 2, 3, 8
    q = torch.randn(b, h, n_q, d, dtype=torch.float64)
    k = torch.randn(b, h, n_k, d, dtype=torch.float64)
    v = torch.randn(b, h, n_k, d, dtype=torch.float64)
    delta = -2 * math.pi * torch.rand(h, d, dtype=torch.float64)
    expected = attention_from_scores(direct_pope_scores(q, k, delta, 500.0, q_offset), v, q_offset, d**-0.5)
    out = pope_attention_reference(q, k, v, delta, theta=500.0, q_offset=q_offset)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_pope_module_uses_its_clamped_delta():
    torch.manual_seed(1)
    pope = PoPE(n_head=2, head_dim=4, theta=10000.0, delta_init="uniform", backend="reference").double()
    assert (pope.delta >= -2 * math.pi).all() and (pope.delta <= 0).all() and pope.delta.std() > 0.5
    with torch.no_grad():
        pope.delta.add_(10.0)  # out of range: attention must see the clamped value 0
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    expected = pope_attention_reference(q, k, v, torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(pope.attend(q, k, v), expected)
    pope.clamp_()
    assert pope.delta.max().item() == 0.0


def direct_rope(x, positions, theta):
    """Rotate each pair (x_i, x_{i+D/2}) by position * theta^(-2i/D) with an explicit 2x2 rotation."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = positions * theta ** (-2 * i / d)
        c, s = torch.cos(angle), torch.sin(angle)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = a * s + b * c
    return out


def test_rope_attention_equals_rotation_formula():
    torch.manual_seed(2)
    d = 8
    rope = RoPE(head_dim=d, theta=100.0).double()
    rope.inv_freq = rope.inv_freq.double()
    q = torch.randn(2, 2, 4, d, dtype=torch.float64)
    k = torch.randn(2, 2, 9, d, dtype=torch.float64)
    v = torch.randn(2, 2, 9, d, dtype=torch.float64)
    q_rot = direct_rope(q, torch.arange(5, 9, dtype=torch.float64), 100.0)
    k_rot = direct_rope(k, torch.arange(9, dtype=torch.float64), 100.0)
    expected = attention_from_scores(q_rot @ k_rot.transpose(-1, -2), v, 5, d**-0.5)
    torch.testing.assert_close(rope.attend(q, k, v, q_offset=5), expected, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rope = RoPE(head_dim=16, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    near = rope.rotate(q, torch.tensor([3])) @ rope.rotate(k, torch.tensor([1])).mT
    far = rope.rotate(q, torch.tensor([1003])) @ rope.rotate(k, torch.tensor([1001])).mT
    torch.testing.assert_close(near, far, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("position", ["pope", "rope", "none"])
@pytest.mark.parametrize(("n_q", "n_k", "q_offset"), [(7, 7, 0), (3, 9, 6)])
def test_scores_are_the_logits_that_attend_softmaxes(position, n_q, n_k, q_offset):
    torch.manual_seed(2)
    b, h, d = 2, 3, 8
    encoding = build_position(ModelConfig(vocab_size=10, n_layer=1, d_model=h * d, n_head=h, head_dim=d,
                                          position=position, delta_init="uniform", theta=500.0)).double()
    q = torch.randn(b, h, n_q, d, dtype=torch.float64)
    k = torch.randn(b, h, n_k, d, dtype=torch.float64)
    v = torch.randn(b, h, n_k, d, dtype=torch.float64)
    scores = encoding.scores(q, k, q_offset=q_offset)
    assert scores.shape == (b, h, n_q, n_k)
    torch.testing.assert_close(attention_from_scores(scores, v, q_offset, 1.0),
                               encoding.attend(q, k, v, q_offset=q_offset), rtol=1e-10, atol=1e-10)


def test_auto_backend_uses_the_kernel_on_cuda_only_for_contexts_longer_than_the_measured_short_limit():
    def auto(on_cuda: bool, head_dim: int = 64, n_keys: int = 1024) -> bool:
        return use_triton("auto", on_cuda=on_cuda, head_dim=head_dim, n_keys=n_keys)

    assert auto(on_cuda=True)
    assert not auto(on_cuda=False)
    assert not auto(on_cuda=True, n_keys=AUTO_REFERENCE_MAX_KEYS)  # indirect indexing's 64 tokens: the reference
    assert auto(on_cuda=True, n_keys=AUTO_REFERENCE_MAX_KEYS + 1)
    assert not auto(on_cuda=True, head_dim=48)  # no kernel for this head dim
    assert not use_triton("reference", on_cuda=True, head_dim=64, n_keys=1024)
    assert use_triton("triton", on_cuda=True, head_dim=64, n_keys=8)  # asked for explicitly: always
    with pytest.raises(RuntimeError, match="needs CUDA"):
        use_triton("triton", on_cuda=False, head_dim=64, n_keys=1024)
