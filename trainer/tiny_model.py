"""`dolly-train init-tiny-model`: the embedded default model.

A small `MistralForCausalLM` built from a config (random init; head_dim 64, which vLLM's CPU attention
supports) with the real Mistral-7B-Instruct-v0.3 tokenizer that ships inside the `mistral-common` package,
saved as a Hugging Face folder that `AutoTokenizer`, `AutoModelForCausalLM` and vLLM load offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from trainer.atomic import atomic_dir

# The v3 SentencePiece model inside mistral-common (32,768 pieces, [INST]/[/INST] as control tokens).
MISTRAL_COMMON_TOKENIZER = "data/mistral_instruct_tokenizer_240323.model.v3"

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "model_max_length": 4096,
}

# Small enough to train in minutes on 2 CPU cores, big enough to learn the synthetic set's facts.
TINY_MISTRAL = dict(
    vocab_size=32768,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects 16, accepts 64
    num_key_value_heads=1,
    max_position_embeddings=4096,
    sliding_window=None,
    rms_norm_eps=1e-5,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def mistral_common_tokenizer_file() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / MISTRAL_COMMON_TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Mistral v3 tokenizer is missing from the installed mistral-common")
    return path


def write_tokenizer(out: Path) -> None:
    shutil.copyfile(mistral_common_tokenizer_file(), out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )


def init_tiny_model(out: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the tiny model folder atomically (a temp dir renamed into place)."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    out = Path(out)
    with atomic_dir(out) as tmp:
        torch.manual_seed(seed)
        config = MistralConfig(**{**TINY_MISTRAL, **overrides})
        config.dtype = torch.float32
        model = MistralForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False, max_new_tokens=256).save_pretrained(tmp)
        write_tokenizer(tmp)
    return out


def parameter_count(config_dict: dict | None = None) -> int:
    from transformers import MistralConfig, MistralForCausalLM
    import torch

    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**(config_dict or TINY_MISTRAL)))
    return sum(p.numel() for p in model.parameters())
