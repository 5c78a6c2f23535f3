"""A thin `transformers` wrapper around the native `pope_lm.model.GPT`, so exported models run in the HF ecosystem.

The wrapper adds no modelling code: the forward pass, the KV cache and the position encodings are the native
model's (`export-hf` copies `model.py`, `position.py` and their dependencies next to this file, their `pope_lm`
imports rewritten to relative ones). It only translates between `transformers`' conventions and the native
ones: HF's `DynamicCache` holds the native per-layer (raw keys, values) caches, logits cover the tokenizer's
vocabulary (the native embedding is padded to a multiple of 64), and `labels` give the shifted LM loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from pope_lm.hf.configuration_pope_lm import PopeLMConfig
from pope_lm.model import GPT
from pope_lm.position import PoPE, RoPE

# transformers renamed the decoding cache from `past_key_values` to `cache` (argument and output field) within
# 5.x; the wrapper reads and writes whichever name the installed version uses.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class PopeLMForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM head model: `generate()` with a KV cache, `labels` for the loss, logits over the real vocabulary."""

    config_class = PopeLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: PopeLMConfig) -> None:
        super().__init__(config)
        self.model = GPT(config.to_model_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embedding

    def _init_weights(self, module: nn.Module) -> None:
        # Fresh models (from_config) get pope-lm's own initialisation, not transformers' generic one: GPT-2 init
        # with scaled residual projections, PoPE's delta init. Loaded weights replace whatever this sets; RoPE's
        # frequency table is no weight (not saved) and is computed here after transformers' meta-device loading.
        if isinstance(module, GPT | PoPE | RoPE | nn.RMSNorm):
            module.reset_parameters()

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, **kwargs: Any
                ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab_size); with `labels`, also the mean next-token loss (labels -100 are ignored).

        The model has no padding mask: an `attention_mask` may only mark right padding, which causal attention
        keeps away from the real tokens. Left padding would shift every position and is rejected.
        """
        _check_right_padded(attention_mask)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("pope-lm models take input_ids, not inputs_embeds")
        cache = kwargs.get(_CACHE_FIELD)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache or cache is not None:
            past_len = cache.get_seq_length() if cache is not None else 0
            layer_caches = [(layer.keys, layer.values) for layer in cache.layers] if past_len else None
            logits, new_caches = self.model.forward_with_cache(input_ids, layer_caches)
            cache = cache if cache is not None else DynamicCache(config=self.config)
            for i, (keys, values) in enumerate(new_caches):  # the native caches are the full (past + new) tensors
                cache.update(keys[:, :, past_len:], values[:, :, past_len:], i)
        else:
            logits = self.model(input_ids)[..., : self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


def _check_right_padded(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is None:
        return
    mask = attention_mask.bool()
    # Right padding: every row is ones then zeros, i.e. never rises again after a zero.
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("pope-lm models support right padding only (set tokenizer.padding_side = 'right')")
