"""`dolly-eval run` options: one dataclass per group, each field carrying its help text.

ENGINE options go to `vllm.LLM(...)`, SAMPLING options to `vllm.SamplingParams(...)` (the split of vLLM's
offline-inference example); SCORING options drive the bootstrap. The same dataclasses are the CLI flags
(`max_new_tokens` -> `--max-new-tokens`), the YAML config file (`--config FILE`, sections `engine:`,
`sampling:`, `scoring:` plus top-level `model`, `data`, `out`, `limit`) and the `metrics.json` record.
Flags win over the file; the file wins over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from trainer.config import ConfigError, build


class EvalInputError(ValueError):
    """Bad input (config, model folder, data split, run dir); the CLI prints it and exits 2."""


def _f(default, help: str, minimum: float | None = None, maximum: float | None = None, choices: tuple | None = None):
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    tensor_parallel_size: int = _f(1, "GPUs the model is sharded over (vLLM tensor parallelism).", minimum=1)
    data_parallel_size: int = _f(1, "Independent engine copies, each on its own tensor_parallel_size GPUs "
                                    "(CUDA_VISIBLE_DEVICES), each generating a contiguous share of the prompts; "
                                    "outputs are merged back in order. Needs data x tensor parallel GPUs.",
                                 minimum=1)
    dtype: str = _f("auto", "Weight/activation dtype: 'auto' takes the model's config (fp32 for the tiny model, "
                            "bf16 for Mistral-7B).", choices=("auto", "float32", "bfloat16", "float16"))
    max_model_len: int | None = _f(None, "Prompt + generation tokens per sequence (default: the model's "
                                         "max_position_embeddings). Smaller = less KV-cache memory.", minimum=2)
    gpu_memory_utilization: float | None = _f(
        None, "Fraction of accelerator memory vLLM may take (default 0.9 on GPUs). On the CPU backend it is a "
              "fraction of host memory and defaults to 0.2: vLLM's 0.92 fails on a shared machine.",
        minimum=0.01, maximum=1.0)
    cpu_kvcache_space_gib: int = _f(1, "CPU backend only: KV-cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE "
                                       "unless it is already set).", minimum=1)
    enforce_eager: bool = _f(False, "Skip CUDA-graph capture / torch.compile: faster start, slower decode. "
                                    "Worth it for small test splits.")
    seed: int = _f(0, "Engine seed (vLLM's global RNG).", minimum=0)
    max_num_seqs: int | None = _f(None, "Sequences vLLM decodes at once (default: vLLM's, 256 on large GPUs). More "
                                        "= higher tokens/s on a GPU with KV-cache room to spare (a 7B on an H200), "
                                        "at the cost of more CUDA graphs to capture at start.", minimum=1)
    cudagraph_capture_sizes: list | None = _f(
        None, "Batch sizes vLLM captures CUDA graphs for at engine start (compilation_config; default: vLLM's, "
              "~50 sizes up to max_num_seqs). Fewer sizes = a shorter start; decode steps of other sizes are "
              "padded up to the next captured one.")
    in_process: bool | None = _f(
        None, "Run vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) instead of in vLLM's own "
              "engine and worker processes, each of which imports vLLM and torch again before the model loads. "
              "Default (unset): on for the CPU backend (measured on 2 cores: engine start 24.7 -> 7.9 s, "
              "identical outputs), vLLM's separate processes on GPUs (not measured there yet: "
              "bench/eval_speed.py --in-process compares the two).")
    cache_root: str | None = _f(None, "vLLM's cache folder (VLLM_CACHE_ROOT): its torch.compile artifacts make the "
                                      "next engine start faster; put it on the shared volume. Default: "
                                      "$VLLM_CACHE_ROOT, else ~/.cache/vllm.")


@dataclass
class SamplingConfig:
    max_new_tokens: int = _f(256, "Generation stops after this many tokens (finish reason 'length') unless "
                                  "</s> comes first ('stop').", minimum=1)
    temperature: float = _f(0.0, "0 = greedy decoding (the default, deterministic); > 0 samples, once per seed.",
                            minimum=0.0)
    top_p: float = _f(1.0, "Nucleus sampling mass (sampled runs only).", minimum=0.0, maximum=1.0)
    seeds: list = _f([0, 1, 2], "Sampled runs: one generation per prompt per seed; per-example scores are "
                                "averaged over seeds. Ignored for greedy runs.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def run_seeds(self) -> list[int | None]:
        """Seeds actually used: one `None` for greedy decoding (no randomness to seed)."""
        return [None] if self.greedy else list(self.seeds)

    def effective(self) -> dict:
        """What decides the generations; `compare` refuses runs whose effective settings differ."""
        if self.greedy:
            return {"greedy": True, "max_new_tokens": self.max_new_tokens, "temperature": 0.0,
                    "top_p": 1.0, "seeds": []}
        return {"greedy": False, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seeds": list(self.seeds)}


@dataclass
class ScoringConfig:
    bootstrap_resamples: int = _f(1000, "Bootstrap resamples for the confidence intervals.", minimum=100)
    bootstrap_seed: int = _f(0, "Seed of the bootstrap's numpy generator (fixed so reports are reproducible).",
                             minimum=0)
    confidence: float = _f(0.95, "Confidence level of the intervals.", minimum=0.5, maximum=0.999)
    permutations: int = _f(10000, "`compare`: sign-flip permutations of the paired test behind each p-value.",
                           minimum=100)
    workers: int = _f(0, "Processes that score ROUGE (0 = one per CPU core, at most 16); the scores are the "
                         "same for any number.", minimum=0)


@dataclass
class RunConfig:
    model: str = _f("", "Model folder (Hugging Face layout: config.json, safetensors, tokenizer.model).")
    data: str = _f("", "Prepared data folder (`dolly-train prepare`): test.jsonl + manifest.json.")
    out: str = _f("", "Output folder; written to a temp folder and renamed into place.")
    limit: int | None = _f(None, "Evaluate only the first N test records (smoke runs).", minimum=1)
    protocol: str = _f("none", "Declare a published protocol ('minillm': 500 examples, temperature 1, top-p 1, "
                               "256 new tokens, 5 seeds; see evaluator/protocols.py): its settings are enforced "
                               "and the report states which published figures the run is comparable to.",
                       choices=("none", "minillm"))
    # issue 25: base + adapter through vLLM's LoRA support (evaluator/adapter.py)
    adapter: str = _f("", "PEFT LoRA adapter folder (`dolly-train export` writes <export>-adapter): vLLM applies it "
                          "to `model` (the base) with enable_lora and a LoRARequest. Empty = score `model` as is.")
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


GROUPS = {"engine": EngineConfig, "sampling": SamplingConfig, "scoring": ScoringConfig}
TOP_LEVEL = ("model", "data", "out", "limit", "protocol", "adapter")
GROUP_HELP = {
    "engine": "passed to vllm.LLM(...); YAML section `engine:`",
    "sampling": "passed to vllm.SamplingParams(...); YAML section `sampling:`",
    "scoring": "ROUGE confidence intervals; YAML section `scoring:`",
}


# ---- argparse from the dataclasses -------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(group, f: dataclasses.Field, typ: Any, default: Any) -> None:
    args = [a for a in get_args(typ) if a is not type(None)]
    base = args[0] if args else typ
    suffix = " (required here or in --config)" if default == "" else "" if default is None else f" (default: {default})"
    # SUPPRESS: an option the user did not give leaves no attribute, so it cannot mask the config file.
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"] + suffix}
    if default == "":
        kw["metavar"] = "DIR"
    if base is bool:
        group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
    elif base is list:
        group.add_argument(_flag(f.name), nargs="+", type=int, metavar="N", **kw)
    else:
        group.add_argument(_flag(f.name), type=base, choices=f.metadata.get("choices"), **kw)


def add_run_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...] = tuple(GROUPS)) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file with the same option names (see "
                        "evaluator/configs/); flags given here win")
    hints = get_type_hints(RunConfig)
    if "engine" in groups:  # the `run` command: model/data/out/limit too
        top = parser.add_argument_group("run")
        for f in dataclasses.fields(RunConfig):
            if f.name in TOP_LEVEL:
                _add_field(top, f, hints[f.name], f.default)
    for name in groups:
        cls = GROUPS[name]
        # Flags are unique across groups, so `from_args` maps each back to its group by name.
        group = parser.add_argument_group(f"{name} options", GROUP_HELP[name])
        inst, sub_hints = cls(), get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, f, sub_hints[f.name], getattr(inst, f.name))


# ---- building and validating ---------------------------------------------------------------------

def _build(cls, data: dict, prefix: str):
    """The trainer's config builder (one implementation), with the evaluator's error type."""
    try:
        return build(cls, data, prefix)
    except ConfigError as e:
        raise EvalInputError(str(e)) from None


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise EvalInputError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise EvalInputError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults <- config file <- flags, then validation (every message names the key or file)."""
    data: dict[str, Any] = _read_yaml(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
    for name in TOP_LEVEL:
        if name in given:
            data[name] = given.pop(name)
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            if f.name in given:
                section = data.setdefault(group, {})
                if not isinstance(section, dict):
                    raise EvalInputError(f"{args.config}: {group}: expected a mapping, got {section!r}")
                section[f.name] = given.pop(f.name)
    try:
        cfg = _build(RunConfig, data, "")
    except EvalInputError as e:
        raise EvalInputError(f"{args.config}: {e}" if args.config else str(e)) from e
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            raise EvalInputError(f"{name}: required (--{name} DIR, or `{name}:` in the config file)")
    if not cfg.sampling.greedy and not cfg.sampling.seeds:
        raise EvalInputError("sampling.seeds: a sampled run (temperature > 0) needs at least one seed")
    if len(set(cfg.sampling.seeds)) != len(cfg.sampling.seeds):
        raise EvalInputError(f"sampling.seeds: duplicates in {cfg.sampling.seeds}")
    if cfg.protocol != "none":
        from evaluator.protocols import check_protocol

        try:
            check_protocol(cfg)
        except EvalInputError as e:
            raise EvalInputError(f"{args.config}: {e}" if args.config else str(e)) from e
    return cfg


def scoring_from_args(args: argparse.Namespace) -> ScoringConfig:
    """`compare`'s options: the `scoring:` section of a config file (other sections are ignored, so a run's
    config file can be passed as is), then the flags."""
    data = _read_yaml(args.config) if getattr(args, "config", None) else {}
    section = dict(data.get("scoring") or {})
    section.update({f.name: getattr(args, f.name) for f in dataclasses.fields(ScoringConfig) if hasattr(args, f.name)})
    try:
        return _build(ScoringConfig, section, "scoring.")
    except EvalInputError as e:
        raise EvalInputError(f"{args.config}: {e}" if args.config else str(e)) from e
