"""GPU kernels for pope-lm (installed as `pope_lm.kernels`): PoPE flash attention (flash.py, and flash_hopper.py on
H100s), the head's fused cross-entropy (cross_entropy.py), both in Triton, and the MLP with GELU in cuBLASLt's matmul
epilogues (gelu_mlp.py).

From the repository root (`python -m pytest`, `python -c`), this folder is also importable as a top-level package
`kernels`: the name of Hugging Face's kernel hub, which transformers imports to probe for it when it finds no installed
metadata. Executing flash.py a second time under that name would register pope-lm's custom ops again over the live
ones, whose handles then dangle (a segfault in torch's dispatcher, seen in the tests). So under any name but its own
the package defines nothing.
"""

if __name__ == "pope_lm.kernels":
    from .cross_entropy import linear_cross_entropy
    from .flash import pope_attention, pope_attention_packed
    from .reference import pope_attention_reference, pope_frequencies

    __all__ = ["linear_cross_entropy", "pope_attention", "pope_attention_packed", "pope_attention_reference",
               "pope_frequencies"]
