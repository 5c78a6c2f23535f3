"""Hugging Face export of pope-lm models (`pope-lm export-hf`).

`configuration_pope_lm.py` and `modeling_pope_lm.py` are the thin `transformers` wrappers around the native
`pope_lm.model.GPT`; `export.py` writes them, together with the native model sources, into an exported folder.
"""
