"""The decoder-only GPT trained by pope-lm: pre-norm RMSNorm blocks, causal self-attention with a pluggable
position encoding (PoPE, RoPE or none), a 4x GELU MLP and an output head tied to the token embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pope_lm.config import ModelConfig
from pope_lm.kernels.reference import causal_mask, split_qkv
from pope_lm.position import PoPE, build_position

# A layer's cache: the raw (un-rotated) keys and the values of every position seen so far, (B, H, N, D) each.
LayerCache = tuple[torch.Tensor, torch.Tensor]


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows: the vocabulary rounded up to a multiple of 64, which keeps the head matmul on fast paths."""
    return math.ceil(vocab_size / multiple) * multiple


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.position = build_position(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def projection(self, x: torch.Tensor) -> torch.Tensor:
        """The raw projection of x (B, T, C): (B, T, 3, H, D), q, k and v along dim 2."""
        b, t, _ = x.shape
        return self.qkv(x).view(b, t, 3, self.n_head, self.head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw q, k, v of x (B, T, C), each (B, H, T, D)."""
        return split_qkv(self.projection(x))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, LayerCache]:
        b, t, c = x.shape
        qkv = self.projection(x)
        q, k, v = split_qkv(qkv)
        if cache is None:
            y = self.position.attend_projection(qkv)
        else:
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
            y = self.position.attend(q, k, v, q_offset=cache[0].shape[2])
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.dropout(self.out(y)), (k, v)

    def max_logit(self, x: torch.Tensor, rows: int = 1024) -> torch.Tensor:
        """The largest pre-softmax logit over the batch, heads and causal (query, key) pairs of x (B, T, C).

        Scored `rows` queries at a time against the keys they see, so that the (H, rows, T) logits stay small at
        long context."""
        q, k, _ = self.project(x)
        best = []
        for start in range(0, q.shape[2], rows):
            end = min(start + rows, q.shape[2])
            logits = self.position.scores(q[:, :, start:end], k[:, :, :end], q_offset=start)
            visible = causal_mask(end - start, end, start, logits.device)
            best.append(logits.masked_fill(~visible, -math.inf).amax())
        return torch.stack(best).amax()


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in its gain's dtype and returned in its input's. Under bf16-mixed (fp32 gains) the bf16 residual
    stream (the default, `fp32_residual` off) is normalized in fp32; torch's fused kernel needs input and gain of one
    dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).type_as(x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = {"gelu": "none", "gelu_tanh": "tanh"}[cfg.activation]
        # the same function with GELU in cuBLASLt's matmul epilogues, for CUDA tensors
        self.fused = _fused_gelu_mlp() if cfg.activation == "gelu_tanh" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and x.is_cuda:
            return self.dropout(self.fused(x, self.up.weight, self.down.weight))
        return self.dropout(self.down(F.gelu(self.up(x), approximate=self.approximate)))


def _fused_gelu_mlp() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    try:  # imported lazily, as the attention kernels: an exported HF model may run without pope_lm.kernels
        from pope_lm.kernels.gelu_mlp import gelu_mlp
    except ImportError:
        return None
    return gelu_mlp


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, LayerCache]:
        attn_out, cache = self.attn(self.attn_norm(x), cache)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), cache


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(padded_vocab_size(cfg.vocab_size), cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = RMSNorm(cfg.d_model, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layer)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, padded vocab) or, with targets (B, T), the mean next-token cross-entropy."""
        x = self.dropout(self.embed(idx))
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x, _ = checkpoint(block, x, use_reentrant=False)
            else:
                x, _ = block(x)
        if targets is None:
            return self.head(x)
        # imported here: only training needs it, and an exported Hugging Face model has no pope_lm.kernels (nor Triton)
        from pope_lm.kernels.cross_entropy import linear_cross_entropy

        # on CUDA a fused kernel that reads the logits once and turns them into their gradient in place
        return linear_cross_entropy(self.final_norm(x), self.embedding.weight, targets)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The residual stream's start: the token embeddings, cast to the autocast dtype unless `fp32_residual`."""
        x = self.embedding(idx)
        device = x.device.type
        if not self.cfg.fp32_residual and torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        # The output projection shares the embedding matrix (tied weights).
        return F.linear(self.final_norm(x), self.embedding.weight)

    def forward_with_cache(self, idx: torch.Tensor, caches: list[LayerCache] | None = None
                           ) -> tuple[torch.Tensor, list[LayerCache]]:
        """Incremental decoding: logits for `idx` (sliced to the real vocabulary) given the cached positions."""
        x = self.embed(idx)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, None if caches is None else caches[i])
            new_caches.append(cache)
        return self.head(x)[..., : self.cfg.vocab_size], new_caches

    @torch.no_grad()
    def max_attention_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Per layer, the largest pre-softmax attention logit on `idx` (B, T), as a (n_layer,) tensor on its device.

        Logits that keep growing sharpen the attention until training turns unstable (Dehghani et al. 2023,
        arXiv 2302.05442; Wortsman et al. 2023, arXiv 2309.14322): logged at validation as an early warning. PoPE's
        softplus magnitudes are unbounded, so its logits can grow without a weight growing visibly."""
        x = self.dropout(self.embed(idx))
        maxima = []
        for block in self.blocks:
            maxima.append(block.attn.max_logit(block.attn_norm(x)))
            x, _ = block(x)
        return torch.stack(maxima)

    @torch.no_grad()
    def clamp_phase_biases_(self) -> None:
        """Keep every PoPE delta inside [-2 pi, 0]; call after each optimizer step."""
        for module in self.modules():
            if isinstance(module, PoPE):
                module.clamp_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, the numerator of MFU.

        6 N for the weight matmuls (N counts every parameter once; with tied weights this includes the output
        head's matmul), plus attention scores and mixing: per layer and head, forward costs
        2 T (w_qk + D) per token, where w_qk = 2D for PoPE (Q K^T runs over the 2D-wide Cartesian q', k') and
        D otherwise; backward costs twice the forward. For RoPE this is PaLM's 12 L H D T.
        """
        cfg = self.cfg
        qk_width = 2 * cfg.head_dim if cfg.position == "pope" else cfg.head_dim
        attention = 3 * cfg.n_layer * cfg.n_head * 2 * seq_len * (qk_width + cfg.head_dim)
        return 6.0 * self.num_parameters() + attention
