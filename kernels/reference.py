"""PoPE attention in plain torch: the CPU fallback, the `reference` model backend and the oracle in tests.

Score between query row i (position t = q_offset + i) and key row j (position s = j), per head h:

    a[i, j] = sm_scale * sum_c softplus(q[i, c]) softplus(k[j, c]) cos((s - t) theta_c + delta[h, c])
    theta_c = theta ** (-c / D),  c = 0 .. D-1   (D frequencies, one per element, not D/2 as in RoPE)

It is computed through the real-valued identity a = sm_scale * <q', k'> with the 2D-wide vectors

    q' = [mu_q cos(t theta), mu_q sin(t theta)],   k' = [mu_k cos(s theta + delta), mu_k sin(s theta + delta)]

so any dot-product attention (here torch's SDPA) runs it. Phases and magnitudes are computed in fp32
(float64 for float64 inputs): t * theta reaches 1e4 rad at long context, where bf16 angles are wrong.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pope_frequencies(head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta_c = theta ** (-c / head_dim) for c = 0 .. head_dim - 1."""
    exponent = torch.arange(head_dim, device=device, dtype=torch.float64) / head_dim
    return (theta ** -exponent).to(dtype)


def pope_cartesian(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                   phase_bias: torch.Tensor | None = None) -> torch.Tensor:
    """[softplus(x) cos(phi), softplus(x) sin(phi)] with phi = positions * freqs (+ phase_bias per head).

    x: (B, H, N, D); positions: (N,); freqs: (D,); phase_bias: (H, D) or None. Returns (B, H, N, 2D)
    in the compute dtype of `freqs`.
    """
    phase = positions.to(freqs.dtype)[:, None] * freqs  # (N, D)
    if phase_bias is not None:
        phase = phase + phase_bias.to(freqs.dtype)[:, None, :]  # (H, N, D)
    magnitude = F.softplus(x.to(freqs.dtype))
    return torch.cat((magnitude * torch.cos(phase), magnitude * torch.sin(phase)), dim=-1)


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, D) as views of a self-attention projection qkv (B, N, 3, H, D)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def causal_mask(n_q: int, n_k: int, q_offset: int, device: torch.device) -> torch.Tensor:
    """Boolean (n_q, n_k) mask, True where key position j <= query position q_offset + i."""
    q_pos = torch.arange(n_q, device=device)[:, None] + q_offset
    return torch.arange(n_k, device=device)[None, :] <= q_pos


def pope_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, *,
                             causal: bool = True, sm_scale: float | None = None, theta: float = 10000.0,
                             q_offset: int = 0) -> torch.Tensor:
    """PoPE attention. q: (B, H, Nq, D), k and v: (B, H, Nk, D), delta: (H, D). Returns (B, H, Nq, D) in q's dtype.

    Differentiable in q, k, v and delta through autograd.
    """
    _check_shapes(q, k, v, delta)
    q2, k2 = _cartesian_pair(q, k, delta, theta, q_offset)
    return sdpa(q2.to(q.dtype), k2.to(q.dtype), v, causal=causal, scale=softmax_scale(q.shape[3], sm_scale),
                q_offset=q_offset)


def pope_scores(q: torch.Tensor, k: torch.Tensor, delta: torch.Tensor, *, sm_scale: float | None = None,
                theta: float = 10000.0, q_offset: int = 0) -> torch.Tensor:
    """The pre-softmax logits a[i, j] of `pope_attention_reference`, (B, H, Nq, Nk) in fp32 (float64 for float64
    inputs), unmasked."""
    q2, k2 = _cartesian_pair(q, k, delta, theta, q_offset)
    return softmax_scale(q.shape[3], sm_scale) * q2 @ k2.transpose(-1, -2)


def softmax_scale(head_dim: int, sm_scale: float | None) -> float:
    """The logits' factor: sm_scale as given, by default 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def _cartesian_pair(q: torch.Tensor, k: torch.Tensor, delta: torch.Tensor, theta: float,
                    q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q' and k' (module docstring) in the compute dtype: fp32, or float64 for float64 inputs."""
    n_q, n_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    freqs = pope_frequencies(head_dim, theta, q.device, compute)
    q_pos = torch.arange(q_offset, q_offset + n_q, device=q.device)
    k_pos = torch.arange(n_k, device=q.device)
    return pope_cartesian(q, q_pos, freqs), pope_cartesian(k, k_pos, freqs, delta)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
         q_offset: int = 0) -> torch.Tensor:
    """Scaled dot-product attention with the causal diagonal placed at key = q_offset + query."""
    n_q, n_k = q.shape[2], k.shape[2]
    if causal and (q_offset != 0 or n_q != n_k):
        mask = causal_mask(n_q, n_k, q_offset, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if tuple(delta.shape) != (q.shape[1], q.shape[3]):
        raise ValueError(f"delta must be (H, D) = {(q.shape[1], q.shape[3])}; got {tuple(delta.shape)}")
