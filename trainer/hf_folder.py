"""Hugging Face model folders: the tokenizer copy and the atomic writer of a consolidated folder (safetensors, config,
generation config, tokenizer) that `transformers` and vLLM load. Used by `trainer.export` and `trainer.lora`."""

from __future__ import annotations

import shutil
from pathlib import Path

from trainer.atomic import atomic_dir

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json")


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, dst / name)


def save_hf_folder(config, state: dict, out: str | Path, tokenizer_from: str | Path,
                   generation_config=None, dtype=None) -> Path:
    """Write atomically: build into a temp dir beside `out`, then rename over it. `dtype`: a torch dtype to
    cast the weights to (None keeps them)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    with atomic_dir(out) as tmp:
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"export: state dict does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        copy_tokenizer(tokenizer_from, tmp)
    return out
