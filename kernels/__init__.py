"""Attention kernels for pope-lm (installed as `pope_lm.kernels`)."""

from .flash import pope_attention
from .reference import pope_attention_reference, pope_frequencies

__all__ = ["pope_attention", "pope_attention_reference", "pope_frequencies"]
