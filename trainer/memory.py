"""Before the model is built: how much GPU memory a config needs, and how much disk a checkpoint takes.

An estimate, not a promise: it counts the large terms (weights, gradients, fp32 master weights and Adam
moments per ZeRO stage and offload, activations per micro-batch with or without activation checkpointing,
the LM head over label positions) and leaves out allocator fragmentation and DeepSpeed's buckets. The GPU
record in docs/benchmarks/ sets each estimate beside the measured peak. A run refuses to start only when the
estimate clearly exceeds the GPU.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.failures import OOM_HINT, FatalError
from trainer.log import get_logger

log = get_logger(__name__)

GIB = 2**30
# Refuse only when the estimate is this much above the device: the estimate omits a few GiB of buckets and
# fragmentation, so a config it puts slightly over may still run (and then fails with the OOM hint).
REFUSE_RATIO = 1.10


class ResourcePreflightError(FatalError):
    """The config cannot fit the GPU or the volume: retrying the same run cannot help (never retried)."""


@dataclass
class MemoryEstimate:
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float  # fp32 master weights + Adam moments held on the GPU
    activations_gib: float
    lm_head_gib: float
    total_gib: float
    device_gib: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        dev = f" of {self.device_gib:.0f} GiB on the device" if self.device_gib else ""
        return (f"GPU memory estimate {self.total_gib:.1f} GiB{dev}: weights {self.weights_gib:.1f}, "
                f"gradients {self.gradients_gib:.1f}, optimizer {self.optimizer_gib:.1f}, "
                f"activations {self.activations_gib:.1f}, LM head {self.lm_head_gib:.1f}")


def estimate_gpu_memory(cfg, model_config, n_params: int, world_size: int) -> MemoryEstimate:
    """Per-GPU bytes for training `n_params` parameters of a decoder-only `model_config` under `cfg`."""
    ds = cfg.deepspeed
    W = max(world_size, 1)
    half = 2 if cfg.model.precision == "bf16" else 4
    H = model_config.hidden_size
    I = model_config.intermediate_size
    n_layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", heads) or heads
    head_dim = getattr(model_config, "head_dim", None) or H // heads
    V = model_config.vocab_size

    # Weights and gradients in the training dtype; ZeRO-3 shards both, ZeRO-2 only the gradients' reduced copy.
    if ds.stage == 3:
        weights = 0 if ds.offload_params else n_params * half / W
        grads = n_params * half / W
    else:
        weights = n_params * half
        grads = n_params * half + n_params * 4 / W  # bf16 grads + the fp32 partition DeepSpeed reduces into
    # fp32 master weights (only with bf16) + two Adam moments, sharded by every ZeRO stage.
    opt_bytes = (4 if cfg.model.precision == "bf16" else 0) + 8
    optimizer = 0 if ds.offload_optimizer else n_params * opt_bytes / W

    tokens = cfg.batch.micro_batch_size * cfg.data.max_length
    # Elements one decoder layer keeps for backward per token: norms, q/k/v, attention output, o_proj output,
    # MLP gate/up/activation/product, down_proj output (SDPA/flex keep no L x L matrix).
    per_layer = 2 * H + (heads + 2 * kv) * head_dim + heads * head_dim + H + 4 * I + H
    if cfg.model.activation_checkpointing:
        # a checkpointed layer keeps its input, one layer's full set lives at a time while it is recomputed;
        # with selective checkpointing the layers past `activation_checkpointing_layers` keep their full set
        n_ckpt = cfg.model.activation_checkpointing_layers
        n_ckpt = n_layers if n_ckpt is None else min(n_ckpt, n_layers)
        activations = tokens * (n_ckpt * H + (n_layers - n_ckpt) * per_layer + per_layer) * half
    else:
        activations = tokens * n_layers * per_layer * half
    # LM head over label positions (at most every token): fp32 logits, their gradient and the bf16 product.
    lm_head = tokens * V * (4 + 4 + half) * 0.5  # ~half the positions carry a label in Dolly's prompts
    if cfg.lora.enabled:  # LoRA: frozen base, adapter-sized gradients and optimizer (trainer/lora.py)
        from trainer.lora import memory_terms

        weights, grads, optimizer, activations = memory_terms(cfg, model_config, n_params, W, half, tokens,
                                                              activations)

    total = weights + grads + optimizer + activations + lm_head
    return MemoryEstimate(*(x / GIB for x in (weights, grads, optimizer, activations, lm_head, total)))


def checkpoint_bytes(n_params: int, save_optimizer_state: bool, precision: str, stage: int = 3) -> int:
    """Bytes one checkpoint takes on the volume, all ranks together."""
    half = 2 if precision == "bf16" else 4
    if not save_optimizer_state:
        return n_params * half  # the weights as a Hugging Face folder
    # DeepSpeed: the optimizer's fp32 copy of the weights (the master weights of a bf16 run, the flat partition of
    # an fp32 one) + two Adam moments in the optimizer shards (12 bytes per parameter: 13.69 GB measured for 1.14B
    # parameters on the H200); ZeRO-2's model-state file also holds the training-dtype weights, ZeRO-3's only
    # placeholders.
    return n_params * (12 + (half if stage == 2 else 0))


def check_gpu_memory(cfg, world_size: int, device, is_main: bool) -> tuple[MemoryEstimate, int]:
    """Before the model is built: the GPU memory this config needs, from the model's config alone (a meta-device
    model counts the parameters). Refuses what clearly cannot fit, naming the knobs. Returns the estimate and
    the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.path)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    est = estimate_gpu_memory(cfg, config, n_params, world_size)
    if device.type == "cuda":
        est.device_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    if is_main and device.type == "cuda":
        log.info(f"{n_params / 1e9:.3f}B parameters; {est.line()}")
    if est.device_gib and est.total_gib > REFUSE_RATIO * est.device_gib:
        raise ResourcePreflightError(f"{est.line()}: clearly more than the GPU holds. {OOM_HINT}")
    return est, n_params


def check_volume(cfg, run_dir: str | Path, needed: int) -> None:
    """Refuses a run whose volume cannot hold one checkpoint of `needed` bytes."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        kind = "full" if cfg.checkpoint.save_optimizer_state else "weights-only"
        raise ResourcePreflightError(
            f"{run_dir}: {free / 1e9:.1f} GB free, but one {kind} checkpoint of this model takes about "
            f"{needed / 1e9:.1f} GB (and {cfg.checkpoint.keep + 1} are on the volume "
            "while the oldest is replaced). Use a larger volume, or checkpoint.save_optimizer_state=false "
            "(weights-only: 2 bytes per parameter), or a smaller checkpoint.keep.")
