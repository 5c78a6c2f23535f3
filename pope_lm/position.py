"""Position encodings, each owning the attention call it needs: PoPE, RoPE, or none (NoPE).

They share one interface, `attend(q, k, v, q_offset) -> out` with q: (B, H, Nq, D) and k, v: (B, H, Nk, D)
holding *raw* projections: the query row i sits at position q_offset + i and key row j at position j, so
a KV cache stores un-rotated keys and decoding passes q_offset = number of cached positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pope_lm.config import ModelConfig
from pope_lm.kernels import pope_attention_reference
from pope_lm.kernels.reference import sdpa


class PoPE(nn.Module):
    """Polar coordinate position embedding (arXiv 2509.10534).

    Magnitudes softplus(q), softplus(k) carry content; phases t * theta_c (queries) and
    s * theta_c + delta_c (keys) carry position, with one frequency theta_c = base^(-c/D) per element.
    delta is a learnable phase bias per (head, element), kept in [-2 pi, 0].
    """

    DELTA_MIN = -2.0 * math.pi
    DELTA_MAX = 0.0

    def __init__(self, n_head: int, head_dim: int, theta: float, delta_init: str, backend: str) -> None:
        super().__init__()
        self.theta = theta
        self.backend = backend
        self.delta = nn.Parameter(torch.zeros(n_head, head_dim))
        self.delta_init = delta_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero init matters for length extrapolation in language modelling (paper, section 4).
        if self.delta_init == "uniform":
            nn.init.uniform_(self.delta, self.DELTA_MIN, self.DELTA_MAX)
        else:
            nn.init.zeros_(self.delta)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project delta back into [-2 pi, 0] (called after every optimizer step)."""
        self.delta.clamp_(self.DELTA_MIN, self.DELTA_MAX)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        delta = self.delta.float().clamp(self.DELTA_MIN, self.DELTA_MAX)
        if _use_triton(self.backend, q):
            from pope_lm.kernels import pope_attention  # imported lazily: Triton JIT is only needed on CUDA

            return pope_attention(q, k, v, delta, causal=True, theta=self.theta, q_offset=q_offset)
        return pope_attention_reference(q, k, v, delta, causal=True, theta=self.theta, q_offset=q_offset)


class RoPE(nn.Module):
    """Rotary position embedding (half-split pairs, as in GPT-NeoX and Llama), the paper's baseline.

    Pair (x_i, x_{i + D/2}) is rotated by angle position * base^(-2i/D).
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angle = positions.float()[:, None] * self.inv_freq  # (N, D/2), fp32: positions reach 1e4
        cos, sin = torch.cos(angle).repeat(1, 2), torch.sin(angle).repeat(1, 2)
        x32 = x.float()
        half = self.head_dim // 2
        rotated_half = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated_half * sin).to(x.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        n_q, n_k = q.shape[2], k.shape[2]
        q_pos = torch.arange(q_offset, q_offset + n_q, device=q.device)
        k_pos = torch.arange(n_k, device=k.device)
        scale = 1.0 / math.sqrt(self.head_dim)
        return sdpa(self.rotate(q, q_pos), self.rotate(k, k_pos), v, causal=True, scale=scale, q_offset=q_offset)


class NoPosition(nn.Module):
    """No position information (NoPE): causal masking alone orders the tokens."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        return sdpa(q, k, v, causal=True, scale=1.0 / math.sqrt(self.head_dim), q_offset=q_offset)


PositionEncoding = PoPE | RoPE | NoPosition


def build_position(cfg: ModelConfig) -> PositionEncoding:
    if cfg.position == "pope":
        return PoPE(cfg.n_head, cfg.head_dim, cfg.theta, cfg.delta_init, cfg.attention_backend)
    if cfg.position == "rope":
        return RoPE(cfg.head_dim, cfg.theta)
    return NoPosition(cfg.head_dim)


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    if backend == "triton":
        if not q.is_cuda:
            raise RuntimeError("model.attention_backend=triton needs CUDA tensors; use 'reference' or 'auto' on CPU")
        return True
    return backend == "auto" and q.is_cuda


__all__ = ["NoPosition", "PoPE", "PositionEncoding", "RoPE", "build_position"]
