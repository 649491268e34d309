"""The one training-config schema.

It drives three faces: the local run (`dolly-train train --config FILE key=value ...`), the Helm chart
(`charts/dolly-train/values.yaml` -> `train:` mirrors these sections key for key and is written into the
ConfigMap verbatim) and the DeepSpeed JSON files under `trainer/configs/deepspeed/` (rendered from it by
`deepspeed_config()`, checked against the committed files by the tests).

Every field carries its help text (TRL style); `dolly-train train --help-config` prints them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "configs"
DEEPSPEED_DIR = PRESET_DIR / "deepspeed"
PRESETS = ("cpu-tiny", "mistral-7b-zero3", "mistral-7b-zero3-offload", "mistral-7b-zero3-1gpu",
           # LoRA / QLoRA (issue 25; trainer/lora.py)
           "cpu-tiny-lora", "mistral-7b-lora-1gpu", "mistral-7b-lora-8gpu", "mistral-7b-qlora-24gb")

_URI = re.compile(r"^(s3|gs)://[^/\s]+(/.*)?$")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


def _f(default, help: str, choices: tuple | None = None, minimum: float | None = None,
       maximum: float | None = None, **kw):
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    path: str = _f("", "Base model: a Hugging Face folder (on the shared volume) or a hub id.")
    attn_implementation: str = _f(
        "sdpa",
        "Attention kernel. 'sdpa' and 'eager' get a block-diagonal 4D mask for packed rows; "
        "'flex_attention' gets a document BlockMask (the fast packed path on GPUs).",
        choices=("sdpa", "eager", "flex_attention"),
    )
    precision: str = _f("fp32", "Training precision: 'bf16' on GPUs (fp32 master weights kept by DeepSpeed), 'fp32' on CPUs.",
                        choices=("bf16", "fp32"))
    activation_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, ~30% more compute.")
    activation_checkpointing_layers: int | None = _f(
        None,
        "With activation_checkpointing: how many decoder layers (the first N) recompute their activations; the "
        "others keep them. null = every layer. Fewer trades GPU memory for speed (selective checkpointing).",
        minimum=0)
    compile: str = _f(
        "none",
        "Compile the model: 'torch' runs torch.compile (inductor) through DeepSpeed's engine.compile(), fusing the "
        "element-wise work between the matmuls (ZeRO-3's parameter hooks split the graph at every module); "
        "'deepcompile' is DeepSpeed's DeepCompile, which compiles ZeRO-3's gathers into the graph (CUDA only; "
        "DeepSpeed builds its `dc` op with nvcc on first use). The first steps pay the compile. Neither has been "
        "measured on a GPU yet (docs/benchmarks.md).",
        choices=("none", "torch", "deepcompile"))


@dataclass
class DataConfig:
    path: str = _f("", "Directory written by `dolly-train prepare` (holds tokenized/train and tokenized/validation).")
    max_length: int = _f(2048, "Tokens per packed row (or the cap per example when packing is off).", minimum=16)
    packing: bool = _f(True, "Pack several examples per row (attention kept within each example). Off = pad to the longest in the batch.")


@dataclass
class OptimConfig:
    lr: float = _f(1e-5, "Peak learning rate.", minimum=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", minimum=0)
    betas: list = _f([0.9, 0.95], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.", minimum=0)
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 turns clipping off).", minimum=0)


@dataclass
class ScheduleConfig:
    epochs: int = _f(1, "Passes over the training split (ignored when max_steps is set).", minimum=1)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).", minimum=1)
    warmup_steps: int = _f(0, "Linear warm-up steps from 0 to the peak learning rate.", minimum=0)
    decay: str = _f("cosine", "Decay after warm-up.", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of the peak.", minimum=0)


@dataclass
class BatchConfig:
    micro_batch_size: int = _f(1, "Rows per worker per forward pass.", minimum=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", minimum=1)


@dataclass
class DeepSpeedConfig:
    stage: int = _f(2, "ZeRO stage: 2 shards optimizer states and gradients, 3 also the parameters.", choices=(2, 3))
    offload_optimizer: bool = _f(False, "Keep optimizer states on the CPU (ZeRO-Offload): less GPU memory, slower steps.")
    offload_params: bool = _f(False, "Keep parameters on the CPU (ZeRO-3 only).")
    overlap_comm: bool = _f(True, "Overlap gradient reduction with the backward pass.")
    reduce_bucket_size: int = _f(500_000_000, "Elements per gradient-reduction bucket.", minimum=1)
    param_persistence_threshold: int = _f(
        100_000,
        "ZeRO-3: parameters with fewer elements stay whole on every rank instead of being gathered for each "
        "forward/backward. Above the largest parameter (e.g. 10000000000) nothing is gathered: right at world "
        "size 1, where sharding saves nothing and gathering costs time.", minimum=0)


@dataclass
class ScalingConfig:
    num_workers: int = _f(1, "Ray Train workers: one per GPU, or CPU processes when use_gpu is false.", minimum=1)
    use_gpu: bool = _f(False, "Give each worker one GPU (NCCL); false = CPU workers with gloo.")
    cpus_per_worker: int = _f(1, "CPUs reserved per worker.", minimum=1)


@dataclass
class CheckpointConfig:
    storage_path: str = _f("/tmp/dolly-train/runs", "Where runs live: a shared filesystem path (the PVC) or an s3:// / gs:// URI.")
    run_name: str = _f("dolly", "Run name; rerunning the same name resumes from its latest checkpoint.")
    every_steps: int = _f(100, "Save a checkpoint every this many optimizer steps (and always at the end).", minimum=1)
    keep: int = _f(2, "Checkpoints kept (oldest are deleted).", minimum=1)
    max_failures: int = _f(3, "Worker-group restarts Ray Train allows after a crash (-1 = unlimited). Failures a restart would "
                            "repeat (out of memory, config error, missing file, import error, watchdog timeout, full "
                            "volume) are never retried (docs/operations.md).", minimum=-1)
    export: bool = _f(True, "Export a consolidated Hugging Face model to <run>/export at the end.")
    save_optimizer_state: bool = _f(
        True,
        "Full checkpoints: DeepSpeed's fp32 master weights and Adam moments (~14 bytes per parameter: ~100 GB "
        "for Mistral-7B). false = weights-only checkpoints (the bf16 weights as a Hugging Face folder, 2 bytes "
        "per parameter, plus LR schedule, data position and RNG) for small volumes: a resume then restarts "
        "Adam's moments from zero and rebuilds the fp32 master weights from bf16.")


@dataclass
class LoggingConfig:
    every_steps: int = _f(10, "Log metrics every this many optimizer steps.", minimum=1)
    eval_every_steps: int = _f(100, "Validation loss every this many optimizer steps (and at the end).", minimum=1)
    eval_max_batches: int | None = _f(None, "Cap on validation micro-batches per worker (None = whole split).", minimum=1)


@dataclass
class WatchdogConfig:
    setup_s: int | None = _f(
        None, "Time limit, in seconds, for each worker setup phase (process group, data load, model build, "
        "deepspeed.initialize, resume) and each checkpoint save. None = 300 + 60 per GB of model weights.", minimum=1)
    step_s: int | None = _f(
        None, "Time limit, in seconds, for one optimizer step (the first one included). "
        "None = 120 + 20 per GB of model weights.", minimum=1)
    collective_s: int = _f(
        1800, "Timeout of the torch process group (NCCL or gloo): a collective that waits longer fails the run. "
        "Keep it above step_s so the watchdog, which names the phase and the stack, fires first.", minimum=1)


# ---- LoRA / QLoRA (issue 25): the schema here, everything else in trainer/lora.py ----------------------
# The ranks vLLM serves: its `max_lora_rank` accepts only these values (vllm/config/lora.py, MaxLoRARanks, the same
# in vLLM 0.25 and 0.32); an adapter of rank r needs max_lora_rank >= r, so r above the largest cannot be served.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LoraConfig:
    method: str = _f(
        "none",
        "'none' = full fine-tune; 'lora' = frozen base + trainable low-rank adapters (checkpoints hold the adapter "
        "and its optimizer state only); 'qlora' = LoRA on a 4-bit (bitsandbytes) base, for GPUs of 24 GB.",
        choices=("none", "lora", "qlora"))
    r: int = _f(16, "Adapter rank. At most 512: the largest max_lora_rank vLLM serves.", minimum=1,
                maximum=VLLM_MAX_LORA_RANKS[-1])
    alpha: float = _f(32.0, "Adapter scale numerator: the update is (alpha / r) * B @ A.", minimum=0)
    dropout: float = _f(0.05, "Dropout on the adapter's input (0 = none).", minimum=0, maximum=0.9)
    target_modules: list = _f(
        ["all-linear"],
        "Module names (the last part, e.g. q_proj) that get adapters; ['all-linear'] = every linear layer of the "
        "decoder (q/k/v/o, gate/up/down), never the LM head. Checked against the model before it is loaded.")
    quant_type: str = _f("nf4", "qlora: 4-bit data type of the frozen base weights.", choices=("nf4", "fp4"))
    double_quant: bool = _f(True, "qlora: quantize the quantization constants too (~0.4 bits per parameter less).")
    compute_dtype: str = _f(
        "auto", "qlora: dtype the 4-bit weights are dequantized to for each matmul; auto = model.precision.",
        choices=("auto", "bf16", "fp32"))
    quant_storage: str = _f(
        "uint8",
        "qlora: dtype the packed 4-bit data is stored in. Only a layout: upstream ZeRO-3/FSDP sharding needs it "
        "equal to the training dtype, ZeRO-2 (the only stage qlora runs under here) does not.",
        choices=("uint8", "bf16", "fp32"))

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model to fine-tune."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prepared data."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "AdamW."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "Length and learning-rate schedule."})
    batch: BatchConfig = field(default_factory=BatchConfig, metadata={"help": "Batching."})
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, metadata={"help": "DeepSpeed ZeRO."})
    scaling: ScalingConfig = field(default_factory=ScalingConfig, metadata={"help": "Ray Train workers."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Checkpoints, resume, export."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "Metrics."})
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig, metadata={"help": "Time limits: fail loudly, never hang."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA / QLoRA (method none = full fine-tune)."})
    seed: int = _f(42, "Seed for model init, data order and dropout.", minimum=0)

    # ---- derived paths -------------------------------------------------------------------------
    @property
    def is_remote_storage(self) -> bool:
        return bool(_URI.match(self.checkpoint.storage_path))

    def run_dir(self) -> str:
        return f"{self.checkpoint.storage_path.rstrip('/')}/{self.checkpoint.run_name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- loading and validation --------------------------------------------------------------------

def check_value(key: str, f: dataclasses.Field, typ: Any, value: Any) -> Any:
    """Type, choices and range of one field's value (field metadata: choices, minimum, maximum); the
    evaluator's config validates through this too."""
    origin = get_origin(typ)
    args = get_args(typ)
    optional = type(None) in args
    base = [a for a in args if a is not type(None)][0] if optional else typ
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif base is list or origin is list:
        item = (get_args(typ) or (None,))[0]
        if item is int and not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"{key}: expected a list of integers, got {value!r}")
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        minimum, maximum = f.metadata.get("minimum"), f.metadata.get("maximum")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}: {value!r} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{key}: {value!r} is above the maximum {maximum}")
    return value


def build(cls, data: dict, prefix: str = ""):
    """An instance of the config dataclass `cls` from a mapping, every value checked (`check_value`), nested
    dataclass fields built from nested mappings; ConfigError names the key. Shared with evaluator/config.py."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (known: {', '.join(names)})")
    kwargs = {}
    for name, value in data.items():
        f, typ = names[name], hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = build(typ, value or {}, key + ".")
        else:
            kwargs[name] = check_value(key, f, typ, value)
    return cls(**kwargs)


def _cross_checks(cfg: TrainConfig) -> None:
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
        raise ConfigError("deepspeed.offload_params: parameter offload needs deepspeed.stage 3")
    if cfg.model.precision == "bf16" and not cfg.scaling.use_gpu:
        raise ConfigError("model.precision: bf16 is for GPU workers; use fp32 with scaling.use_gpu false")
    if cfg.model.attn_implementation == "flex_attention" and not cfg.scaling.use_gpu:
        raise ConfigError("model.attn_implementation: flex_attention needs GPU workers; use sdpa on CPUs")
    if cfg.model.compile == "deepcompile" and not cfg.scaling.use_gpu:
        raise ConfigError("model.compile: deepcompile needs GPU workers (DeepSpeed's `dc` op is CUDA-only); "
                          "use 'torch' or 'none' on CPUs")
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas!r}")
    if not cfg.model.path:
        raise ConfigError("model.path: required (a model folder or hub id)")
    if not cfg.data.path:
        raise ConfigError("data.path: required (the output directory of `dolly-train prepare`)")
    sp = cfg.checkpoint.storage_path
    if "://" in sp and not _URI.match(sp):
        raise ConfigError(f"checkpoint.storage_path: {sp!r} is neither a filesystem path nor an s3:// or gs:// URI")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", cfg.checkpoint.run_name):
        raise ConfigError(f"checkpoint.run_name: {cfg.checkpoint.run_name!r} must be 1-63 letters, digits, '.', '_' or '-'")
    _lora_checks(cfg)


def _lora_checks(cfg: TrainConfig) -> None:
    """LoRA combinations refused before anything loads (issue 25). The target modules are checked against the
    model's own module names in `trainer.lora.check_target_modules` (launch preflight, meta device)."""
    lc = cfg.lora
    if not lc.enabled:
        return
    if not lc.target_modules or not all(isinstance(m, str) and m for m in lc.target_modules):
        raise ConfigError(f"lora.target_modules: expected a non-empty list of module names, got {lc.target_modules!r}")
    if "all-linear" in lc.target_modules and len(lc.target_modules) > 1:
        raise ConfigError("lora.target_modules: 'all-linear' stands alone (it already means every linear layer)")
    if not cfg.checkpoint.save_optimizer_state:
        raise ConfigError("checkpoint.save_optimizer_state: must stay true with lora.method "
                          f"{lc.method}: a LoRA checkpoint is the adapter and its optimizer state only (tens of MB)")
    if lc.method == "qlora":
        if cfg.deepspeed.stage != 2:
            raise ConfigError(
                f"lora.method: qlora runs under deepspeed.stage 2 only (got {cfg.deepspeed.stage}): ZeRO-3 would "
                "partition the packed 4-bit weights, which bitsandbytes and DeepSpeed support only with "
                "lora.quant_storage equal to the training dtype and which was never run here; the frozen 4-bit base "
                "is small enough to be replicated on every GPU (3.9 GB for Mistral-7B)")
        if cfg.deepspeed.offload_params:
            raise ConfigError("deepspeed.offload_params: not with lora.method qlora (4-bit weights stay on the GPU)")
        if cfg.model.compile != "none":
            raise ConfigError("model.compile: not with lora.method qlora (bitsandbytes' 4-bit matmul is not compiled here)")
        if lc.compute_dtype == "bf16" and not cfg.scaling.use_gpu:
            raise ConfigError("lora.compute_dtype: bf16 is for GPU workers; use auto or fp32 on CPUs")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"command-line override {text!r}: expected key=value, e.g. optim.lr=2e-5")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def from_dict(data: dict) -> TrainConfig:
    cfg = build(TrainConfig, data)
    _cross_checks(cfg)
    return cfg


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a preset shipped in trainer/configs/."""
    p = Path(name_or_path)
    if p.exists():
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a preset ({', '.join(PRESETS)})")


def load(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    p = resolve_config_path(str(path))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    # An error is reported where it is: in the file, in one command-line override, or in the combination.
    try:
        build(TrainConfig, copy.deepcopy(data))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
    for text in overrides or []:
        one = apply_overrides(copy.deepcopy(data), [text])
        try:
            build(TrainConfig, one)
        except ConfigError as e:
            raise ConfigError(f"command-line override {text!r}: {e}") from e
    try:
        return from_dict(apply_overrides(data, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{p}{' with the command-line overrides' if overrides else ''}: {e}") from e


# ---- DeepSpeed -----------------------------------------------------------------------------------

def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON for this config. Batch sizes are per worker; the world size is filled in
    by DeepSpeed from micro-batch x accumulation x world size."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.stage == 2:
        zero["allgather_bucket_size"] = ds.reduce_bucket_size
    else:
        # Gather whole 16-bit weights at save time so the export needs no offline consolidation.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_prefetch_bucket_size"] = ds.reduce_bucket_size // 10
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out = {
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.model.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.model.compile == "deepcompile":  # read by engine.compile(), which the recipe calls
        out["compile"] = {"deepcompile": True}
    return out


def render_deepspeed_json(cfg: TrainConfig) -> str:
    return json.dumps(deepspeed_config(cfg), indent=2) + "\n"


def describe(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every leaf field, for --help-config and the docs."""
    out = []
    hints = get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f.metadata.get("help", ""), getattr(inst, f.name)))
    return out
