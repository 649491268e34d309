"""`dolly-eval run --adapter DIR`: score base + a PEFT LoRA adapter through vLLM's own LoRA support
(`LLM(enable_lora=True, max_lora_rank=...)` and a `LoRARequest` per generate call), instead of the merged folder
`dolly-train export` writes beside it (issue 25). The same prompts, sampling and scoring; `metrics.json` gets an
`adapter` record, so `dolly-eval compare` can set the two paths side by side.

Checked before the engine starts: the folder is a PEFT LoRA adapter (adapter_config.json +
adapter_model.safetensors), without `modules_to_save` (vLLM refuses such adapters), of a rank vLLM serves.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluator.config import EvalInputError

# vLLM's max_lora_rank accepts only these (vllm/config/lora.py MaxLoRARanks; trainer/config.py keeps the same list)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_NAME, LORA_ID = "dolly-adapter", 1


def check_adapter(adapter_dir: str | Path) -> dict:
    """The adapter's record (path, rank, alpha, target modules, file hash, the max_lora_rank vLLM gets)."""
    from evaluator.inputs import sha256_file

    d = Path(adapter_dir).resolve()
    cfg_file, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise EvalInputError(f"--adapter {adapter_dir}: not a PEFT adapter folder (needs adapter_config.json and "
                             "adapter_model.safetensors; `dolly-train export` writes one as <export>-adapter)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise EvalInputError(f"{cfg_file}: not valid JSON ({e})") from e
    if cfg.get("peft_type") != "LORA":
        raise EvalInputError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; vLLM serves LORA adapters only")
    if cfg.get("modules_to_save"):
        raise EvalInputError(f"{cfg_file}: modules_to_save {cfg['modules_to_save']} is set; vLLM refuses adapters "
                             "that replace whole modules: score the merged export instead")
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1 or r > VLLM_MAX_LORA_RANKS[-1]:
        raise EvalInputError(f"{cfg_file}: r={r!r}; vLLM serves ranks 1-{VLLM_MAX_LORA_RANKS[-1]}")
    return {"path": str(d), "r": r, "alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules"),
            "base_model_name_or_path": cfg.get("base_model_name_or_path"),
            "weights_sha256": sha256_file(weights), "max_lora_rank": max_lora_rank(r)}


def max_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves rank `r` (a larger one only wastes buffer memory)."""
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= r)


def engine_kwargs(adapter: dict) -> dict:
    return {"enable_lora": True, "max_lora_rank": adapter["max_lora_rank"], "max_loras": 1}


def lora_request(adapter: dict):
    from vllm.lora.request import LoRARequest

    return LoRARequest(LORA_NAME, LORA_ID, adapter["path"])
