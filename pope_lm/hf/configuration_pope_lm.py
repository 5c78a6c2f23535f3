"""The Hugging Face configuration of an exported pope-lm model.

Its model fields are exactly those of `pope_lm.model_config.ModelConfig`, taken from it rather than listed
again: a field added there is exported and read back without a change here. `export-hf` copies this file into
the exported folder with its `pope_lm` imports rewritten to relative ones.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

from transformers import PretrainedConfig

from pope_lm.model_config import ModelConfig


class PopeLMConfig(PretrainedConfig):
    """A pope-lm GPT as a `transformers` config; `to_model_config()` gives the native `ModelConfig`."""

    model_type = "pope_lm"
    # transformers' generic code (caches, lm-eval, pipelines) reads these standard names.
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
    }

    max_position_embeddings: int = 1024  # the training context; PoPE (and scaled RoPE) run beyond it
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # The native model shares one matrix between embedding and output head by construction (no separate head
    # parameter), so transformers must not try to tie anything itself.
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        for field in fields(ModelConfig):
            setattr(self, field.name, kwargs.pop(field.name, field.default))
        super().__post_init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{field.name: getattr(self, field.name) for field in fields(ModelConfig)})
