"""Dolly data: sources, validation, split, tokenization (`trainer.prompt`) and packing."""
