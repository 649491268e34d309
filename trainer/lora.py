"""LoRA and QLoRA: a property of the model and of what trains, not a second training loop (issue 25).

The recipe (`trainer/recipe.py`) runs unchanged; these helpers are its hooks, each marked `# LoRA:` there:
- `check_target_modules` (launch preflight): the configured target modules exist in the model as linear layers,
  checked on the meta device from config.json alone, before any weight is loaded;
- `load_base` + `wrap`: the frozen base (bf16/fp32, or 4-bit NF4/FP4 through bitsandbytes for QLoRA) with peft's
  LoRA layers injected in place; the optimizer sees only the adapter (`requires_grad`);
- checkpoints hold the adapter and its optimizer state only (DeepSpeed's `exclude_frozen_parameters`), and
  resume loads them over a freshly built base (`load_module_strict=False`);
- `export_adapter_and_merged`: the PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
  PEFT's key names: what peft and vLLM's LoRA loader read) and the merged model (W + (alpha / r) * B @ A merged
  into the un-quantized base weights, in fp32, saved in the base's dtype) that vLLM loads as a plain model. For
  QLoRA the record (`lora_export.json`) states the logits distance between the merged model and the
  adapter-on-4-bit model the run trained.

Upstream pitfalls, checked in the pinned versions (peft 0.21.2, DeepSpeed 0.19.8, transformers 5.19):
- Adapters saved empty under ZeRO-3 (huggingface/peft#2892, transformers#41416): ZeRO-3 leaves every parameter as
  a 0-element placeholder; `save_pretrained` of the live model writes those. Here the adapter is gathered with
  `_zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)` and written from the gathered copy; a
  test checks every saved tensor has the adapter's shape.
- Activation checkpointing: with reentrant checkpointing the segments' inputs (frozen embeddings) need
  `requires_grad`, or the adapters get no gradient and stay zero without an error. The recipe uses
  non-reentrant checkpointing and also calls `enable_input_require_grads()`; the tests check every `lora_B` moved.
- vLLM refuses adapters with `modules_to_save` (new full layers) or resized embeddings: neither is ever set here.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import ConfigError, TrainConfig
from trainer.log import get_logger

log = get_logger(__name__)

ALL_LINEAR = "all-linear"
ADAPTER_SUFFIX = "-adapter"  # <export>-adapter beside the merged <export> folder
RECORD = "lora_export.json"


# ---- config checks that need the model's shape (no weights) ---------------------------------------------

def linear_module_names(model_path: str) -> dict[str, str]:
    """{full module name: class name} of every linear layer of the model, from config.json on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_target_modules(cfg: TrainConfig) -> None:
    """Every `lora.target_modules` entry names a linear layer of the model (by its last name part, as peft
    matches it); the LM head is refused (vLLM serves no adapter on it). ConfigError names the knob."""
    if not cfg.lora.enabled or cfg.lora.target_modules == [ALL_LINEAR]:
        return
    linears = linear_module_names(cfg.model.path)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    for target in cfg.lora.target_modules:
        if target == "lm_head":
            raise ConfigError("lora.target_modules: lm_head cannot take an adapter (vLLM serves none there); "
                              f"the decoder's linear layers are {leaves}")
        if target not in leaves:
            raise ConfigError(f"lora.target_modules: {target!r} is not a linear layer of {cfg.model.path} "
                              f"(its linear layers: {leaves}, or 'all-linear')")


def peft_target_modules(cfg: TrainConfig):
    t = cfg.lora.target_modules
    return ALL_LINEAR if t == [ALL_LINEAR] else list(t)


def peft_config(cfg: TrainConfig, base_path: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=peft_target_modules(cfg), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_path or cfg.model.path)


# ---- model --------------------------------------------------------------------------------------------------

def _torch_dtype(name: str, precision: str):
    import torch

    name = precision if name == "auto" else name
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "uint8": torch.uint8}[name]


def quantization_config(cfg: TrainConfig):
    from transformers import BitsAndBytesConfig

    lc = cfg.lora
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=lc.quant_type,
                              bnb_4bit_use_double_quant=lc.double_quant,
                              bnb_4bit_compute_dtype=_torch_dtype(lc.compute_dtype, cfg.model.precision),
                              bnb_4bit_quant_storage=_torch_dtype(lc.quant_storage, cfg.model.precision))


def load_base(cfg: TrainConfig, path: str, dtype, device):
    """The base model, frozen: in `dtype`, or for QLoRA quantized to 4 bits on `device` as it loads."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if cfg.lora.method == "qlora":
        kwargs = {"quantization_config": quantization_config(cfg), "device_map": {"": str(device)}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
                                                 **kwargs)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def wrap(model, cfg: TrainConfig):
    """Inject the adapters (peft) into `model` in place. Returns (the HF model with adapters, which the recipe's
    loss wraps as before, and the PeftModel, which knows the adapter's layout)."""
    from peft import get_peft_model

    if cfg.model.activation_checkpointing:
        model.enable_input_require_grads()  # see the module docstring: adapters behind checkpointed segments
    peft_model = get_peft_model(model, peft_config(cfg))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError(f"lora.target_modules: {cfg.lora.target_modules} matched no layer: nothing would train")
    hf_model = peft_model.base_model.model
    # The live model's state dict is the adapter alone: DeepSpeed's exclude_frozen_parameters drops frozen
    # parameters by their named_parameters() name and so keeps a tied alias (the tiny model's lm_head.weight, the
    # frozen embedding under a second name) in every checkpoint.
    hf_model.register_state_dict_post_hook(_adapter_only)
    return hf_model, peft_model


def _adapter_only(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and ".lora_" not in k]:
        del state_dict[key]


def trainable_count(cfg: TrainConfig) -> int:
    """Adapter parameters for `cfg`, from config.json on the meta device: r x (in + out) per adapted linear."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = peft_target_modules(cfg)
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if targets == ALL_LINEAR or name.rsplit(".", 1)[-1] in targets:
            n += cfg.lora.r * (m.in_features + m.out_features)
    return n


def adapted_linears(cfg: TrainConfig, model_config) -> list[tuple[str, int, int]]:
    """(name, in, out) of one decoder layer's linears that get adapters, from the model config alone."""
    targets = peft_target_modules(cfg)
    return [t for t in layer_linears(model_config) if targets == ALL_LINEAR or t[0] in targets]


def _dims(model_config) -> tuple[int, int, int, int, int]:
    """hidden, intermediate, attention heads, KV heads, head size of a Mistral-style config."""
    H, I = model_config.hidden_size, model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", heads) or heads
    return H, I, heads, kv, getattr(model_config, "head_dim", None) or H // heads


def layer_linears(model_config) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear of one decoder layer."""
    H, I, heads, kv, hd = _dims(model_config)
    return [("q_proj", H, heads * hd), ("k_proj", H, kv * hd), ("v_proj", H, kv * hd), ("o_proj", heads * hd, H),
            ("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)]


def adapter_shapes(cfg: TrainConfig, model_config) -> list[tuple[int, int]]:
    """The adapter's parameter shapes (lora_A: r x in, lora_B: out x r for every adapted linear of every layer),
    from the model config alone: what the optimizer holds (trainer/memory.py's host-memory preflight)."""
    r = cfg.lora.r
    per_layer = [s for _, i, o in adapted_linears(cfg, model_config) for s in ((r, i), (o, r))]
    return per_layer * model_config.num_hidden_layers


def layer_saved_bytes(cfg: TrainConfig, model_config, half: int, mask_bytes: float,
                      input_requires_grad: bool = True) -> float:
    """Bytes per token that one decoder layer with adapters keeps for the backward pass: autograd's saved tensors,
    counted op by op in the layer's order (PyTorch's derivative formulas, peft's LoRA Linear, transformers'
    Mistral layer) and checked against a real layer by tests/test_lora_memory.py. The base is frozen, so no base
    linear keeps its input, and an op keeps something only once a gradient flows through it. Kept:
    - each of the two RMSNorms: its input upcast to fp32 and the fp32 1/rms (4H + 4 bytes);
    - attention (SDPA, flex): q, k and v after RoPE (k, v with the KV heads), the output and the fp32 log-sum-exp
      per head; o_proj's input is that output itself (the kernels write it token-major, so the reshape is free);
    - the MLP: gate and up outputs and SiLU(gate) (3I);
    - per adapted linear: lora_A's output (r) for lora_B, and lora_A's input: with dropout a dropped-out copy
      per linear plus dropout's mask (`mask_bytes` an element: a bool on CUDA, the scaled noise in the training
      dtype on a CPU, where ATen has no fused dropout); without dropout the tensor the linear reads (the norms'
      outputs, the attention output, the MLP product), once per tensor.
    `input_requires_grad=False`: the first layer when nothing before it trains (frozen embeddings, no
    activation checkpointing): nothing is kept before the first adapted linear."""
    H, I, heads, kv, hd = _dims(model_config)
    adapted = {n for n, _, _ in adapted_linears(cfg, model_config)}
    dropout = cfg.lora.dropout > 0
    total = 0.0

    def adapters(names: tuple[str, ...], width: int, grad_in: bool, input_kept: bool) -> float:
        """lora_A's inputs and outputs of the adapted `names` reading one `width`-wide tensor."""
        mine = [n for n in names if n in adapted]
        if not mine:
            return 0.0
        out = half * cfg.lora.r * len(mine)
        if dropout:  # a dropped-out copy each; the mask only where a gradient flows back into the input
            return out + len(mine) * width * (half + (mask_bytes if grad_in else 0))
        return out + (0 if input_kept else half * width)

    grad = input_requires_grad
    total += (4 * H + 4) if grad else 0                                     # input_layernorm
    total += adapters(("q_proj", "k_proj", "v_proj"), H, grad, False)
    grad = grad or bool(adapted & {"q_proj", "k_proj", "v_proj"})
    total += (half * (2 * heads * hd + 2 * kv * hd) + 4 * heads) if grad else 0  # attention
    total += adapters(("o_proj",), heads * hd, grad, grad)
    grad = grad or "o_proj" in adapted
    total += (4 * H + 4) if grad else 0                                     # post_attention_layernorm
    total += adapters(("gate_proj", "up_proj"), H, grad, False)
    gate, up = grad or "gate_proj" in adapted, grad or "up_proj" in adapted
    # SiLU keeps gate; act * up keeps each factor the other one's gradient needs
    total += half * I * ((1 if gate else 0) + (1 if gate else 0) + (1 if up else 0))
    total += adapters(("down_proj",), I, gate or up, False)
    return total


def memory_terms(cfg: TrainConfig, model_config, n_params: int, W: int, half: int, tokens: int,
                 device_type: str = "cuda") -> tuple[float, ...]:
    """Per-GPU bytes of (weights, gradients, optimizer, held activations, one recomputed layer, transient buffers)
    for a LoRA/QLoRA run (trainer/memory.py): the frozen base without gradients or optimizer state (4-bit for
    QLoRA: half a byte per linear weight plus its quantization constants), the adapter's gradients, fp32 master
    copy and Adam moments, the activations of `layer_saved_bytes`, and for QLoRA the largest linear dequantized
    to the compute dtype for the backward pass (bitsandbytes' MatMul4Bit)."""
    linears = adapted_linears(cfg, model_config)
    L = model_config.num_hidden_layers
    H, _, _, _, hd = _dims(model_config)
    trainable = L * sum(cfg.lora.r * (i + o) for _, i, o in linears)
    extra = 0.0
    if cfg.lora.method == "qlora":
        shapes = [(i, o) for _, i, o in layer_linears(model_config)]  # every linear is quantized, adapted or not
        quantized = L * sum(i * o for i, o in shapes)
        # 4 bits a weight + one absmax per 64 (fp32, or 8 bits + a second-level constant with double quant)
        per_weight = 0.5 + (1.0 / 64 + 4 / (64 * 256) if cfg.lora.double_quant else 4 / 64)
        weights = quantized * per_weight + (n_params - quantized) * half
        extra = max(i * o for i, o in shapes) * half
    else:
        weights = n_params * half / (W if cfg.deepspeed.stage == 3 else 1)
    weights += trainable * half
    grads = trainable * half + (trainable * 4 / W if cfg.deepspeed.stage == 2 else 0)
    optimizer = 0 if cfg.deepspeed.offload_optimizer else trainable * ((4 if half == 2 else 0) + 8) / W

    mask = 1 if device_type == "cuda" else half
    layer = layer_saved_bytes(cfg, model_config, half, mask)
    model_wide = 2 * hd * half + 4 * H + 4  # RoPE's cos and sin (shared by every layer), the final norm
    if cfg.model.activation_checkpointing:  # enable_input_require_grads: every layer's input needs a gradient
        n_ckpt = cfg.model.activation_checkpointing_layers
        n_ckpt = L if n_ckpt is None else min(n_ckpt, L)
        held = tokens * (n_ckpt * H * half + (L - n_ckpt) * layer + model_wide)
        recompute = tokens * layer
    else:
        first = layer_saved_bytes(cfg, model_config, half, mask, input_requires_grad=False)
        held, recompute = tokens * (first + (L - 1) * layer + model_wide), 0.0
    return weights, grads, optimizer, held, recompute, extra


def adapter_state(state: dict) -> dict:
    """Only the adapter's tensors of a state dict with the recipe's names (`model.` prefix of the loss wrapper
    removed), e.g. model.layers.0.self_attn.q_proj.lora_A.default.weight."""
    return {k: v for k, v in state.items() if ".lora_" in k}


# ---- export -------------------------------------------------------------------------------------------------

def adapter_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / (out.name + ADAPTER_SUFFIX)


def export_adapter_and_merged(cfg: TrainConfig, adapter: dict, out: str | Path, tokenizer_from: str | Path,
                              generation_config=None, dtype=None, probe_ids=None) -> tuple[Path, Path]:
    """Write the PEFT adapter folder (`<out>-adapter`) and the merged model (`<out>`), both atomically.

    `adapter`: the trained adapter tensors with the recipe's names (see `adapter_state`). The merge happens in
    fp32 on the CPU into the un-quantized base weights read from `cfg.model.path` (for QLoRA too), then the
    merged weights are cast to `dtype` (None = the base config's dtype)."""
    import torch
    from peft import get_peft_model

    from trainer.atomic import atomic_dir
    from trainer.hf_folder import copy_tokenizer, save_hf_folder

    out = Path(out)
    adapter_out = adapter_dir_for(out)
    base = load_base(_unquantized(cfg), cfg.model.path, torch.float32, "cpu")
    peft_model = get_peft_model(base, peft_config(cfg))
    target = peft_model.base_model.model
    expected = set(adapter_state(target.state_dict()))
    got = {k: v.detach().to("cpu", torch.float32) for k, v in adapter.items()}
    if set(got) != expected:
        missing, extra = sorted(expected - set(got)), sorted(set(got) - expected)
        raise RuntimeError(f"export: adapter tensors do not match the model (missing {missing[:3]}, extra {extra[:3]})")
    for k, v in got.items():
        if v.numel() == 0:  # a ZeRO-3 placeholder: the gather was skipped
            raise RuntimeError(f"export: adapter tensor {k} is empty (an ungathered ZeRO-3 parameter)")
    target.load_state_dict(got, strict=False)
    if peft_model.peft_config["default"].modules_to_save:
        raise RuntimeError("export: modules_to_save is set; vLLM refuses such adapters")
    with atomic_dir(adapter_out) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(tokenizer_from, tmp)
    record = {"method": cfg.lora.method, "r": cfg.lora.r, "alpha": cfg.lora.alpha,
              "target_modules": cfg.lora.target_modules, "base_model": cfg.model.path,
              "adapter_dir": str(adapter_out), "adapter_tensors": len(got),
              "adapter_parameters": int(sum(v.numel() for v in got.values()))}
    if cfg.lora.method == "qlora" and probe_ids is not None:
        record["qlora_logits_distance"] = qlora_logits_distance(cfg, adapter_out, peft_model, probe_ids)
    merged = peft_model.merge_and_unload()
    config = merged.config
    state = merged.state_dict()
    # the base's own dtype from its config.json: `config` is the fp32 merge's (loading in fp32 rewrites it)
    from transformers import AutoConfig

    target_dtype = dtype if dtype is not None else _config_dtype(AutoConfig.from_pretrained(cfg.model.path))
    save_hf_folder(config, state, out, tokenizer_from=tokenizer_from, generation_config=generation_config,
                   dtype=target_dtype)
    record["merged_dir"], record["merged_dtype"] = str(out), str(target_dtype).removeprefix("torch.")
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return adapter_out, out


def _config_dtype(config):
    import torch

    d = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, d) if isinstance(d, str) else d


def _unquantized(cfg: TrainConfig) -> TrainConfig:
    import copy

    plain = copy.deepcopy(cfg)
    plain.lora.method = "lora"
    return plain


def qlora_logits_distance(cfg: TrainConfig, adapter_dir: Path, merged_peft, probe_ids) -> dict:
    """How far the merged model (fp32, un-quantized base + adapter) is from what the run trained: the adapter
    on the 4-bit base. Logits on `probe_ids` (a (1, L) tensor): max and mean absolute difference, and how
    often the greedy next token agrees."""
    import torch
    from peft import PeftModel

    device = "cuda" if torch.cuda.is_available() and cfg.scaling.use_gpu else "cpu"
    q = load_base(cfg, cfg.model.path, _torch_dtype(cfg.lora.compute_dtype, cfg.model.precision), device)
    q = PeftModel.from_pretrained(q, str(adapter_dir)).eval()
    with torch.no_grad():
        a = q(probe_ids.to(device)).logits.float().cpu()
        b = merged_peft.eval()(probe_ids).logits.float()
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "greedy_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "tokens": int(probe_ids.numel())}


def export_checkpoint(ckpt: Path, cfg: TrainConfig, out: str | Path, dtype) -> tuple[Path, Path]:
    """`dolly-train export` of a LoRA checkpoint: the adapter's fp32 weights from DeepSpeed's files (frozen
    weights are not in them), merged into the base model the run's config names."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import GenerationConfig

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state",
                                                     exclude_frozen_parameters=True)
    adapter = adapter_state({k.removeprefix("model."): v for k, v in state.items()})
    hf = ckpt / "hf"
    gen = GenerationConfig.from_pretrained(hf) if (hf / "generation_config.json").is_file() else None
    return export_adapter_and_merged(cfg, adapter, out, tokenizer_from=hf, generation_config=gen, dtype=dtype)
