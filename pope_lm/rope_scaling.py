"""RoPE context extension: the frequency tables and attention temperature of PI, NTK-aware scaling and YaRN.

A RoPE model trained at L tokens sees rotation angles it never met once positions pass L, and its perplexity
blows up there (the paper's baseline). These methods change the RoPE frequencies theta_i = b^(-2i/D),
i = 0 .. D/2 - 1, so that s x L positions look like the trained range; the paper's RoPE+YaRN baseline uses YaRN
with s = 4, fine-tuned at 4096 tokens. Formulas, as published:

- PI (Chen et al. 2023, arXiv 2306.15595): theta_i / s  (every position divided by s).
- NTK-aware (bloc97 2023; YaRN paper eq. 16): base b' = b * s^(D / (D - 2)), theta_i = b'^(-2i/D): high
  frequencies barely move, the lowest one is interpolated by exactly s.
- YaRN (Peng et al. 2023, arXiv 2309.00071, eqs. 17-22): wavelength lambda_i = 2 pi / theta_i, ratio
  r_i = L / lambda_i (rotations over the trained context), ramp gamma(r) = 0 for r < alpha, 1 for r > beta,
  (r - alpha) / (beta - alpha) between, with alpha = 1, beta = 32; new frequency
  (1 - gamma) theta_i / s + gamma theta_i, so dimensions that turn many times keep their frequency and those that
  turn less than once are interpolated. Attention temperature: sqrt(1/t) = 0.1 ln(s) + 1 multiplies q and k,
  so the attention logits are multiplied by (0.1 ln(s) + 1)^2.

The YaRN ramp here is linear in r, as the paper writes it; the authors' code (and Hugging Face's) ramps
linearly in the dimension index between the dimensions where r = beta and r = alpha, which agrees at the ends and
differs slightly in between.
"""

from __future__ import annotations

import math

import torch

SCALING_TYPES = ("none", "pi", "ntk", "yarn")
YARN_ALPHA = 1.0
YARN_BETA = 32.0


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                             original_max_len: int = 1024) -> torch.Tensor:
    """The D/2 RoPE frequencies (float64) for a scaling method; 'none' gives the trained theta_i = b^(-2i/D)."""
    _check(scaling, factor, original_max_len)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    base = theta ** -exponent
    if scaling == "none":
        return base
    if scaling == "pi":
        return base / factor
    if scaling == "ntk":
        return (theta * factor ** (head_dim / (head_dim - 2))) ** -exponent
    rotations = original_max_len * base / (2 * math.pi)  # r_i = L / lambda_i
    ramp = ((rotations - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
    return (1.0 - ramp) * base / factor + ramp * base


def attention_logit_scale(scaling: str, factor: float) -> float:
    """Multiplier of the attention logits: YaRN's (0.1 ln(s) + 1)^2, 1 for the other methods."""
    _check(scaling, factor, 1)
    if scaling != "yarn":
        return 1.0
    return (0.1 * math.log(factor) + 1.0) ** 2


def _check(scaling: str, factor: float, original_max_len: int) -> None:
    if scaling not in SCALING_TYPES:
        raise ValueError(f"rope scaling must be one of {', '.join(SCALING_TYPES)}; got '{scaling}'")
    if not factor >= 1.0:  # also rejects NaN
        raise ValueError(f"rope scaling factor must be >= 1; got {factor}")
    if original_max_len <= 0:
        raise ValueError(f"rope original max length must be positive; got {original_max_len}")
