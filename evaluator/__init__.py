"""dolly-eval: vLLM batch generation on the held-out Dolly split, scored with ROUGE."""

__version__ = "0.1.0"
