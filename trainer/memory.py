"""Before the model is built: how much GPU memory a config needs, how much host memory an offload config needs,
and how much disk a checkpoint takes.

An estimate, not a promise: it counts the large terms (weights, gradients, fp32 master weights and Adam
moments per ZeRO stage and offload, activations per micro-batch with or without activation checkpointing,
the LM head over label positions, DeepSpeed's ZeRO-1/2 gradient reduction buckets) and leaves out allocator
fragmentation and ZeRO-3's buckets. The peak is where backward begins: everything the forward kept, plus the
LM head's backward; with activation checkpointing the LM head's buffers are gone before the first layer is
recomputed, so the peak takes the larger of the two, not their sum. For LoRA the activations are autograd's
saved tensors of a layer with adapters, counted term by term (trainer/lora.py; tests/test_lora_memory.py checks
the count against a real layer). The GPU record in docs/benchmarks/ sets each estimate beside the measured
peak. A run refuses to start only when the estimate clearly exceeds the GPU.
"""

from __future__ import annotations

import math
import os
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
    buffers_gib: float  # DeepSpeed's ZeRO-1/2 reduction buckets; QLoRA's dequantized weight in backward
    total_gib: float
    device_gib: float | None = None
    host: "HostMemoryEstimate | None" = None  # with optimizer or parameter offload only

    def as_dict(self) -> dict:
        d = asdict(self)
        host = d.pop("host")
        if host:  # flat keys: the metrics log holds scalars
            d.update({f"host_{k}": v for k, v in host.items() if k != "limit_source"})
        return d

    def line(self) -> str:
        dev = f" of {self.device_gib:.0f} GiB on the device" if self.device_gib else ""
        return (f"GPU memory estimate {self.total_gib:.1f} GiB{dev}: weights {self.weights_gib:.1f}, "
                f"gradients {self.gradients_gib:.1f}, optimizer {self.optimizer_gib:.1f}, "
                f"activations {self.activations_gib:.1f}, LM head {self.lm_head_gib:.1f}, buffers {self.buffers_gib:.1f}")


def reduction_buckets(cfg, half: int) -> float:
    """DeepSpeed's ZeRO-1/2 gradient reduction buckets: with `contiguous_gradients` (always on here) each backward
    allocates a buffer of `reduce_bucket_size` elements in the training dtype, and a second one with `overlap_comm`
    (DeepSpeed 0.19.8, runtime/zero/stage_1_and_2.py, `setup_buckets`), whatever the number of trained parameters:
    1.9 GiB at the default 5e8 in bf16. ZeRO-3's buffers are not counted."""
    ds = cfg.deepspeed
    if ds.stage == 3:
        return 0.0
    return (2 if ds.overlap_comm else 1) * ds.reduce_bucket_size * half


def estimate_gpu_memory(cfg, model_config, n_params: int, world_size: int, device_type: str = "cuda") -> MemoryEstimate:
    """Per-GPU bytes for training `n_params` parameters of a decoder-only `model_config` under `cfg` on a
    `device_type` device (it decides how large a LoRA dropout mask is)."""
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
        # a checkpointed layer keeps its input; with selective checkpointing the layers past
        # `activation_checkpointing_layers` keep their full set; in backward one layer's full set is recomputed
        n_ckpt = cfg.model.activation_checkpointing_layers
        n_ckpt = n_layers if n_ckpt is None else min(n_ckpt, n_layers)
        held = tokens * (n_ckpt * H + (n_layers - n_ckpt) * per_layer) * half
        recompute = tokens * per_layer * half
    else:
        held, recompute = tokens * n_layers * per_layer * half, 0.0
    # LM head over label positions (at most every token): fp32 logits, their gradient and the bf16 product.
    lm_head = tokens * V * (4 + 4 + half) * 0.5  # ~half the positions carry a label in Dolly's prompts
    buffers = reduction_buckets(cfg, half)
    if cfg.lora.enabled:  # LoRA: frozen base, adapter-sized gradients and optimizer (trainer/lora.py)
        from trainer.lora import memory_terms

        weights, grads, optimizer, held, recompute, extra = memory_terms(cfg, model_config, n_params, W, half,
                                                                          tokens, device_type)
        buffers += extra

    activations = held + recompute
    # the peak: where backward starts (all that is held + the LM head's backward), or, with checkpointing, where a
    # layer is recomputed (the LM head's buffers are freed by then)
    total = weights + grads + optimizer + buffers + held + max(lm_head, recompute)
    return MemoryEstimate(weights_gib=weights / GIB, gradients_gib=grads / GIB, optimizer_gib=optimizer / GIB,
                          activations_gib=activations / GIB, lm_head_gib=lm_head / GIB, buffers_gib=buffers / GIB,
                          total_gib=total / GIB)


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


# ---- host memory (optimizer / parameter offload) ------------------------------------------------------------

# Resident host memory of one training process before any offloaded state: CUDA context, torch, transformers,
# DeepSpeed and the Ray worker (an allowance, not measured per term).
RANK_BASELINE_BYTES = 4 * GIB
# DeepSpeed's default `sub_group_size` (ZeRO-3 splits each rank's flat partitions into groups of this many elements).
ZERO3_SUB_GROUP = 1_000_000_000
HOST_KNOBS = ("Knobs: deepspeed.offload_optimizer=false (optimizer states back on the GPUs, with deepspeed.stage=3 "
              "and more workers to shard them), deepspeed.offload_params=false, more nodes for the same workers "
              "(each node holds only its own ranks' partitions), or a larger pod memory limit "
              "(worker.resources.limits.memory in the chart). DOLLY_HOST_MEMORY_GIB states the host memory where "
              "it cannot be read (a VM whose MemTotal grows as it is used).")


def pinned(nbytes: float) -> int:
    """Bytes PyTorch's caching host allocator takes for a pinned tensor: the next power of two (ATen's
    CachingHostAllocator.h rounds every pinned block so; DeepSpeed pins every offloaded buffer)."""
    n = int(nbytes)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@dataclass
class HostMemoryEstimate:
    master_gib: float      # fp32 master weights (pinned)
    gradients_gib: float   # fp32 gradient partitions, plus ZeRO-1/2's per-parameter accumulation buffers (pinned)
    moments_gib: float     # Adam's two fp32 moments (pageable)
    params_gib: float      # training-dtype parameters: ZeRO-3 offload_params, or ZeRO-1/2's pinned update buffer
    baseline_gib: float    # RANK_BASELINE_BYTES per process on the node
    ranks_on_node: int
    total_gib: float
    limit_gib: float | None = None
    limit_source: str = ""

    def line(self) -> str:
        lim = f" of {self.limit_gib:.0f} GiB ({self.limit_source})" if self.limit_gib else ""
        return (f"host memory estimate {self.total_gib:.1f} GiB{lim} for the {self.ranks_on_node} rank(s) on this "
                f"node: fp32 master weights {self.master_gib:.1f}, fp32 gradients {self.gradients_gib:.1f}, Adam "
                f"moments {self.moments_gib:.1f}, parameters/buffers {self.params_gib:.1f}, processes "
                f"{self.baseline_gib:.1f}")


def _chunks(n: float, size: int) -> list[float]:
    full, rest = divmod(int(n), size)
    return [size] * full + ([rest] if rest else [])


def estimate_host_memory(cfg, param_shapes: list[tuple], world_size: int, ranks_on_node: int,
                         pin: bool = True, trained_shapes: list[tuple] | None = None) -> HostMemoryEstimate:
    """Host bytes the ranks on one node hold with DeepSpeed's optimizer/parameter offload (DeepSpeed 0.19.8,
    runtime/zero/stage_1_and_2.py and stage3.py); the offloaded terms are zero without offload.

    Each rank holds 1/world_size of every offloaded state. ZeRO-1/2 with offload_optimizer, per parameter group
    (the recipe has two: weights with decay, norms without): a pinned fp32 partition of the master weights, a
    pinned fp32 gradient partition, a pinned update buffer in the training dtype, Adam's moments (8 bytes), and
    with gradient accumulation a pinned buffer per parameter in the training dtype. ZeRO-3: the fp32 master
    weights and an fp32 gradient buffer per sub-group of `sub_group_size` elements, one flat gradient buffer in
    the training dtype, the moments, and with offload_params the parameters in the training dtype. Pinned blocks round up to powers of two (`pin`). Model loading
    comes before these and is freed before them (the weights go to the GPU), so it is not added.

    `trained_shapes`: the parameters the optimizer holds, when not all of them (LoRA: the adapter; the frozen base
    has no master weights, gradients or moments, but is offloaded with offload_params like any parameter)."""
    ds = cfg.deepspeed
    W = max(world_size, 1)
    half = 2 if cfg.model.precision == "bf16" else 4
    pinned_ = pinned if pin else float  # pin=False: the tensors' own bytes (a CPU run pins nothing)
    trained = param_shapes if trained_shapes is None else trained_shapes
    numels = [math.prod(s) for s in trained]
    ndims = [len(s) for s in trained]
    n = sum(numels)
    master = grads = moments = params = 0
    if ds.offload_optimizer:
        moments = 8 * n / W
        if ds.stage == 3:
            chunks = _chunks(n / W, ZERO3_SUB_GROUP)
            master = sum(pinned_(4 * c) for c in chunks)
            # each sub-group keeps a pinned fp32 gradient buffer for the CPU Adam step (released only without
            # offload), beside the flat buffer the reduced gradients land in (gradient-accumulation dtype)
            grads = sum(pinned_(4 * c) for c in chunks) + pinned_(half * n / W)
        else:
            groups = [sum(k for k, d in zip(numels, ndims) if d >= 2) / W,  # the recipe's groups
                      sum(k for k, d in zip(numels, ndims) if d < 2) / W]
            master = sum(pinned_(4 * g) for g in groups)
            grads = sum(pinned_(4 * g) for g in groups)
            params = sum(pinned_(half * g) for g in groups)
            if cfg.batch.gradient_accumulation_steps > 1:
                grads += sum(pinned_(half * k) for k in numels) / W
    if ds.stage == 3 and ds.offload_params:
        every = sum(math.prod(s) for s in param_shapes)  # frozen ones too
        params += sum(pinned_(half * c) for c in _chunks(every / W, ZERO3_SUB_GROUP))
    per_rank = master + grads + moments + params
    base = RANK_BASELINE_BYTES * ranks_on_node
    total = per_rank * ranks_on_node + base
    return HostMemoryEstimate(*(x * ranks_on_node / GIB for x in (master, grads, moments, params)),
                              base / GIB, ranks_on_node, total / GIB)


def host_memory_limit() -> tuple[float | None, str]:
    """Bytes this pod/process may use on the host and where that came from: DOLLY_HOST_MEMORY_GIB, else the
    cgroup's limit (v2 memory.max, v1 memory.limit_in_bytes; under DOLLY_CGROUP_ROOT, default /sys/fs/cgroup),
    else MemAvailable (DOLLY_MEMINFO, default /proc/meminfo)."""
    if os.environ.get("DOLLY_HOST_MEMORY_GIB"):
        return float(os.environ["DOLLY_HOST_MEMORY_GIB"]) * GIB, "DOLLY_HOST_MEMORY_GIB"
    root = os.environ.get("DOLLY_CGROUP_ROOT", "/sys/fs/cgroup")
    for rel in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            raw = open(os.path.join(root, rel)).read().strip()
        except OSError:
            continue
        # v2 writes "max" when unlimited, v1 a number near 2**63
        if raw != "max" and int(raw) < 2**60:
            return float(raw), f"cgroup {os.path.join(root, rel)}"
    try:
        for line in open(os.environ.get("DOLLY_MEMINFO", "/proc/meminfo")):
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return None, "unknown"


def check_host_memory(cfg, param_shapes: list[tuple], world_size: int,
                      trained_shapes: list[tuple] | None = None) -> HostMemoryEstimate | None:
    """With optimizer or parameter offload: refuses, before the model is loaded, a config whose offloaded state
    clearly exceeds the host memory of its node (the pod's limit where one is set), naming the knobs. The ranks on
    a node: LOCAL_WORLD_SIZE (Ray Train and torchrun set it), else every rank."""
    if not (cfg.deepspeed.offload_optimizer or (cfg.deepspeed.stage == 3 and cfg.deepspeed.offload_params)):
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size or 1)
    est = estimate_host_memory(cfg, param_shapes, world_size, local, trained_shapes=trained_shapes)
    limit, source = host_memory_limit()
    est.limit_gib, est.limit_source = (limit / GIB if limit else None), source
    if limit and est.total_gib > REFUSE_RATIO * est.limit_gib:
        raise ResourcePreflightError(f"{est.line()}: clearly more than the host holds. {HOST_KNOBS}")
    return est


def check_gpu_memory(cfg, world_size: int, device, is_main: bool) -> tuple[MemoryEstimate, int]:
    """Before the model is built: the GPU memory this config needs, from the model's config alone (a meta-device
    model counts the parameters). Refuses what clearly cannot fit, naming the knobs. Returns the estimate and
    the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.path)
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in AutoModelForCausalLM.from_config(config).parameters()]
    n_params = sum(math.prod(s) for s in shapes)
    est = estimate_gpu_memory(cfg, config, n_params, world_size, device.type)
    trained = None
    if cfg.lora.enabled:  # LoRA: the optimizer holds the adapter only (A: r x in, B: out x r per adapted linear)
        from trainer.lora import adapter_shapes

        trained = adapter_shapes(cfg, config)
    est.host = check_host_memory(cfg, shapes, world_size, trained)  # refuses an offload config the host cannot hold
    if is_main and est.host is not None:
        log.info(est.host.line())
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
