"""The model's architecture settings, kept free of any dependency beyond the standard library.

It lives apart from `pope_lm.config` (which needs omegaconf) because `pope-lm export-hf` copies this file, the
model and the position code verbatim into a Hugging Face folder, where they must import with torch alone.
`pope_lm.config` re-exports `ModelConfig` and validates its values as part of a `RunConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 50257  # the tokenizer's vocabulary; the embedding is padded up to a multiple of 64
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    head_dim: int = 64
    mlp_ratio: int = 4
    # The MLP's GELU: gelu (exact, with erf) | gelu_tanh (the tanh approximation GPT-2 trained with). On CUDA in bf16 or
    # fp16, gelu_tanh runs inside cuBLASLt's matmul epilogues (pope_lm/kernels/gelu_mlp.py), which removes the GELU
    # kernels' passes over the (tokens x 4d) activations; the recipes use it. The default stays gelu, the function of
    # checkpoints saved before this field existed.
    activation: str = "gelu"
    dropout: float = 0.0
    position: str = "pope"  # pope | rope | none
    theta: float = 10000.0  # frequency base for PoPE and RoPE
    delta_init: str = "zero"  # PoPE phase bias init: zero (language modelling) | uniform (Uniform(-2pi, 0))
    attention_backend: str = "auto"  # reference | triton | auto (triton on CUDA, reference elsewhere)
    init_std: float = 0.02
    # Recompute each block's activations in the backward instead of keeping them: saves most activation memory
    # (only the block inputs stay) for about one extra forward of compute. Training only.
    activation_checkpointing: bool = False
    # Under autocast (bf16-mixed), the residual stream x = x + block(x) in the autocast dtype (false), as Megatron-LM's
    # default and torchtitan's bf16 training keep it, or in fp32, as autocast leaves it (the embedding returns fp32).
    # bf16 moves half the bytes through every norm, residual add and their backward (+4% tokens/s at 124M and 774M on
    # an H100) and trained to the same loss within run-to-run noise (benchmarks/train_throughput_results.md, session
    # 23); the norms compute in fp32 either way. No effect without autocast.
    fp32_residual: bool = False
    # RoPE context extension (pope_lm/rope_scaling.py), for scoring or fine-tuning a RoPE model beyond the length it
    # was trained at: none | pi (position interpolation) | ntk (NTK-aware base change) | yarn. The factor s stretches
    # the context from rope_original_max_len to s x rope_original_max_len. PoPE and NoPE ignore all three.
    rope_scaling_type: str = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int = 1024
