"""Position encodings, each owning the attention call it needs: PoPE, RoPE, or none (NoPE).

They share one interface, `attend(q, k, v, q_offset) -> out` with q: (B, H, Nq, D) and k, v: (B, H, Nk, D)
holding *raw* projections: the query row i sits at position q_offset + i and key row j at position j, so
a KV cache stores un-rotated keys and decoding passes q_offset = number of cached positions. Without a cache the model
calls `attend_projection(qkv)` on its (B, T, 3, H, D) projection instead, which PoPE's kernel takes whole. `scores(q, k,
q_offset)` gives the pre-softmax logits of the same attention, (B, H, Nq, Nk) in fp32 (or wider) and unmasked, for
diagnostics (GPT.max_attention_logits).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from pope_lm.config import ModelConfig
from pope_lm.kernels import pope_attention_reference
from pope_lm.kernels.reference import pope_scores, sdpa, softmax_scale, split_qkv
from pope_lm.rope_scaling import attention_logit_scale, rope_inverse_frequencies


class _SelfAttention(nn.Module):
    """What every position encoding does with a self-attention projection without a cache."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def attend_projection(self, qkv: torch.Tensor) -> torch.Tensor:
        """Causal self-attention of the projection qkv (B, T, 3, H, D): `attend` of its q, k, v."""
        return self.attend(*split_qkv(qkv))


class PoPE(_SelfAttention):
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

    def scores(self, q: torch.Tensor, k: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        return pope_scores(q, k, self._delta(), theta=self.theta, q_offset=q_offset)

    def _delta(self) -> torch.Tensor:
        return self.delta.float().clamp(self.DELTA_MIN, self.DELTA_MAX)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        if use_triton(self.backend, on_cuda=q.is_cuda, head_dim=q.shape[-1], n_keys=k.shape[2]):
            return self._kernels().pope_attention(q, k, v, self._delta(), causal=True, theta=self.theta,
                                                  q_offset=q_offset)
        return pope_attention_reference(q, k, v, self._delta(), causal=True, theta=self.theta, q_offset=q_offset)

    def attend_projection(self, qkv: torch.Tensor) -> torch.Tensor:
        if use_triton(self.backend, on_cuda=qkv.is_cuda, head_dim=qkv.shape[-1], n_keys=qkv.shape[1]):
            # the gradient of qkv comes back in its own layout (no copy to stack dq, dk, dv)
            return self._kernels().pope_attention_packed(qkv, self._delta(), causal=True, theta=self.theta)
        return super().attend_projection(qkv)

    def _kernels(self) -> ModuleType:
        try:  # imported lazily: only CUDA runs need Triton (an exported HF model may lack pope_lm.kernels)
            from pope_lm import kernels
        except ImportError as exc:
            raise RuntimeError(f"attention_backend={self.backend} needs pope-lm's Triton kernel: {exc}") from exc
        return kernels


class RoPE(_SelfAttention):
    """Rotary position embedding (half-split pairs, as in GPT-NeoX and Llama), the paper's baseline.

    Pair (x_i, x_{i + D/2}) is rotated by angle position * base^(-2i/D). A context-extension method
    (pope_lm/rope_scaling.py: pi, ntk or yarn by `factor`) changes those frequencies and, for YaRN, the logit scale.
    """

    def __init__(self, head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                 original_max_len: int = 1024) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta, self.scaling, self.factor, self.original_max_len = theta, scaling, factor, original_max_len
        self.logit_scale = attention_logit_scale(scaling, factor)
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the frequency table; transformers calls this after building an exported model on the meta device."""
        table = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling, self.factor, self.original_max_len)
        self.inv_freq.copy_(table)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angle = positions.float()[:, None] * self.inv_freq  # (N, D/2), fp32: positions reach 1e4
        cos, sin = torch.cos(angle).repeat(1, 2), torch.sin(angle).repeat(1, 2)
        x32 = x.float()
        half = self.head_dim // 2
        rotated_half = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated_half * sin).to(x.dtype)

    def _rotated(self, q: torch.Tensor, k: torch.Tensor, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        q_pos = torch.arange(q_offset, q_offset + q.shape[2], device=q.device)
        k_pos = torch.arange(k.shape[2], device=k.device)
        return self.rotate(q, q_pos), self.rotate(k, k_pos)

    def _scale(self) -> float:
        return self.logit_scale / math.sqrt(self.head_dim)

    def scores(self, q: torch.Tensor, k: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        q, k = self._rotated(q, k, q_offset)
        return self._scale() * _at_least_fp32(q) @ _at_least_fp32(k).transpose(-1, -2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        q, k = self._rotated(q, k, q_offset)
        return sdpa(q, k, v, causal=True, scale=self._scale(), q_offset=q_offset)


class NoPosition(_SelfAttention):
    """No position information (NoPE): causal masking alone orders the tokens."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def scores(self, q: torch.Tensor, k: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        return softmax_scale(self.head_dim, None) * _at_least_fp32(q) @ _at_least_fp32(k).transpose(-1, -2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
        return sdpa(q, k, v, causal=True, scale=softmax_scale(self.head_dim, None), q_offset=q_offset)


PositionEncoding = PoPE | RoPE | NoPosition


def build_position(cfg: ModelConfig) -> PositionEncoding:
    if cfg.position == "pope":
        return PoPE(cfg.n_head, cfg.head_dim, cfg.theta, cfg.delta_init, cfg.attention_backend)
    if cfg.position == "rope":
        return RoPE(cfg.head_dim, cfg.theta, cfg.rope_scaling_type, cfg.rope_scaling_factor,
                    cfg.rope_original_max_len)
    return NoPosition(cfg.head_dim)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# `auto` leaves contexts of at most this many keys to the reference (compiled elementwise + SDPA): there the fused
# kernel's five launches per layer (pre-pass, forward, pre-pass, dk/dv, dq finish) cost more than they save.
# Measured at 64 tokens: recipes/indirect.yaml at batch 256 on 4 x H200, 2026-11-26, reference 49.4 steps/s, kernel
# 37.0 and 35.6, RoPE 52.7 (the second-call logs of experiments/results/2026-11-26-h200-indirect-attempt6..8). At
# 128 tokens and beyond the kernel is ahead (124M on an H100: 1.26x the reference at 128, 1.30x at 256, 1.26x at
# 512; benchmarks/train_throughput_results.md, session 8). 124M at 64 tokens is unmeasured.
AUTO_REFERENCE_MAX_KEYS = 64


def use_triton(backend: str, *, on_cuda: bool, head_dim: int, n_keys: int) -> bool:
    """`triton`: always (CUDA only); `auto`: on CUDA when the kernel exists here, supports the head dim and the
    context is longer than AUTO_REFERENCE_MAX_KEYS."""
    if backend == "triton":
        if not on_cuda:
            raise RuntimeError("model.attention_backend=triton needs CUDA tensors; use 'reference' or 'auto' on CPU")
        return True
    if backend != "auto" or not on_cuda or n_keys <= AUTO_REFERENCE_MAX_KEYS:
        return False
    try:
        from pope_lm.kernels.flash import HEAD_DIMS
    except ImportError:  # an exported model running without pope-lm installed
        return False
    return head_dim in HEAD_DIMS


__all__ = ["NoPosition", "PoPE", "PositionEncoding", "RoPE", "build_position"]
