"""pope-lm: pretraining decoder LMs with PoPE attention."""
__version__ = "0.1.0"
