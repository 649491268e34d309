"""Hugging Face export: a consolidated folder (safetensors, config, generation config, tokenizer) that
`transformers` and vLLM load.

Two ways in:
- at the end of training, from the live engine (`FullFinetuneRecipe.export`; ZeRO-3 gathers its shards);
- on demand, `dolly-train export --checkpoint RUN/checkpoint_N --out DIR`, from the DeepSpeed files of any
  checkpoint (ZeRO-2 or ZeRO-3 shards consolidated to fp32 by DeepSpeed's own `zero_to_fp32`).

A LoRA / QLoRA run (lora.method) writes two folders: DIR, the adapter merged into the base weights (a plain
Hugging Face model), and DIR-adapter, the PEFT adapter (trainer/lora.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from trainer.atomic import atomic_dir
# The folder writers live in trainer/hf_folder.py (trainer.lora uses them too, and this module imports trainer.lora
# for LoRA checkpoints); re-exported here for the recipe and the tests.
from trainer.hf_folder import TOKENIZER_FILES, copy_tokenizer, save_hf_folder  # noqa: F401
from trainer.log import get_logger

log = get_logger(__name__)


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    ckpt = Path(checkpoint)
    hf = ckpt / "hf"
    if not (ckpt / "deepspeed").is_dir() and any(hf.glob("*.safetensors")):
        # a weights-only checkpoint (checkpoint.save_optimizer_state=false): <ckpt>/hf is already the export
        with atomic_dir(out) as tmp:
            shutil.copytree(hf, tmp, dirs_exist_ok=True)
        return Path(out)
    if not (ckpt / "deepspeed").is_dir() or not (hf / "config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt}: not a dolly-train checkpoint (expected deepspeed/ and hf/config.json inside; "
            "checkpoints are the checkpoint_<step> folders in a run dir)"
        )
    # imported only now: a wrong path fails at once, without DeepSpeed's start-up warnings
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(hf)
    lora_cfg = _lora_config(ckpt)
    if lora_cfg is not None:  # LoRA: <out>-adapter (PEFT) + <out> merged into the base (trainer/lora.py)
        from trainer import lora

        dt = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        return lora.export_checkpoint(ckpt, lora_cfg, out, dt)[1]
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    target = {"auto": getattr(config, "dtype", None) or torch.float32, "fp32": torch.float32,
              "bf16": torch.bfloat16}[dtype]
    if isinstance(target, str):
        target = getattr(torch, target)
    gen = GenerationConfig.from_pretrained(hf) if (hf / "generation_config.json").is_file() else None
    return save_hf_folder(config, state, out, tokenizer_from=hf, generation_config=gen, dtype=target)


def _lora_config(ckpt: Path):
    """The run's config when the checkpoint is a LoRA one (its config.yaml has lora.method lora/qlora)."""
    import yaml

    from trainer import config as config_mod

    path = ckpt / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    if (data.get("lora") or {}).get("method", "none") == "none":
        return None
    return config_mod.from_dict(data)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="consolidate a training checkpoint into a Hugging Face folder",
        description="Consolidate a checkpoint's ZeRO-2/3 shards into a Hugging Face folder (safetensors, config, "
                    "generation config, tokenizer) loadable by transformers and vLLM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint_<step> folder of a run")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights dtype; auto = the model config's dtype")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except FileNotFoundError as e:
        print(f"dolly-train export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    if (Path(out) / "lora_export.json").is_file():  # LoRA: the adapter folder beside the merged one
        print(f"adapter (PEFT) -> {Path(str(out) + '-adapter')}")
    return 0
