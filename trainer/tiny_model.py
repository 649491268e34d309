"""Random-init model folders: `dolly-train init-tiny-model` (the embedded default) and `dolly-train init-model`.

A `MistralForCausalLM` built from a config (random init) with the real Mistral-7B-Instruct-v0.3 tokenizer that
ships inside the `mistral-common` package, saved as a Hugging Face folder that `AutoTokenizer`,
`AutoModelForCausalLM` and vLLM load offline:
- `tiny`: 5.2M parameters, head_dim 64 (which vLLM's CPU attention supports), trains in minutes on 2 CPU cores;
- `mistral-7b`: Mistral-7B-Instruct-v0.3's exact architecture (7.25B parameters, bf16 safetensors), for runs
  and benchmarks where the real weights cannot be downloaded; `--layers N` keeps the width at a smaller depth.
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


# Mistral-7B-Instruct-v0.3's config.json, field for field (7.25B parameters).
MISTRAL_7B = dict(
    vocab_size=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=32768,
    initializer_range=0.02,
    rms_norm_eps=1e-5,
    rope_theta=1_000_000.0,
    sliding_window=None,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHITECTURES = {"tiny": TINY_MISTRAL, "mistral-7b": MISTRAL_7B}


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
    return init_model(out, arch="tiny", seed=seed, **overrides)


def init_model(out: str | Path, arch: str = "tiny", seed: int = 0, layers: int | None = None,
               dtype: str | None = None, device: str | None = None, **overrides) -> Path:
    """Write a random-init model folder of `arch` atomically. `dtype` defaults to fp32 for `tiny` (CPU
    training) and bf16 otherwise (the dtype Mistral publishes); `device` to CUDA when there is one, where
    initialising 7B parameters takes seconds instead of minutes."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    dtype = dtype or ("float32" if arch == "tiny" else "bfloat16")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = device or ("cuda" if torch.cuda.is_available() and arch != "tiny" else "cpu")
    fields = {**ARCHITECTURES[arch], **overrides}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    out = Path(out)
    with atomic_dir(out) as tmp:
        torch.manual_seed(seed)
        config = MistralConfig(**fields)
        config.dtype = torch_dtype
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)  # allocate in the target dtype: no fp32 copy of 7B parameters
        try:
            with torch.device(device):
                model = MistralForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False, max_new_tokens=256).save_pretrained(tmp)
        write_tokenizer(tmp)
    return out


def parameter_count(config_dict: dict | None = None) -> int:
    """Parameters of a Mistral config (built on the meta device: no memory)."""
    from transformers import MistralConfig, MistralForCausalLM
    import torch

    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**(config_dict or TINY_MISTRAL)))
    return sum(p.numel() for p in model.parameters())
