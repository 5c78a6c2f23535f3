"""Triton kernels for pope-lm (installed as `pope_lm.kernels`): PoPE flash attention (flash.py, and flash_hopper.py on
H100s) and the head's fused cross-entropy (cross_entropy.py)."""

from .cross_entropy import linear_cross_entropy
from .flash import pope_attention
from .reference import pope_attention_reference, pope_frequencies

__all__ = ["linear_cross_entropy", "pope_attention", "pope_attention_reference", "pope_frequencies"]
