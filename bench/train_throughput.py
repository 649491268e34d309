"""Training throughput of the project's own training step on one GPU (no Ray needed).

    python bench/train_throughput.py --out results/                      # the default variant set
    python bench/train_throughput.py --model DIR --data DIR --variants preset-1gpu --steps 10

Loads a Mistral-7B-architecture folder (`--model`; default: one written once by `dolly-train init-model --arch
mistral-7b`, random weights, no download) with `from_pretrained`, exactly as `dolly-train train` does, feeds it
packed rows of Dolly-length data (a `dolly-train prepare` dir with `--data`, else the synthetic generator's
`profile="dolly"` tokenized by `trainer.prompt`), and times `FullFinetuneRecipe.train_step` - the same model
load, DeepSpeed engine, collation and attention path `dolly-train train` runs - at world size 1
(`LocalContext`, no Ray). Each variant runs in its own process, so an out-of-memory variant is recorded as such
and does not poison the next.

Measured in one run: a bf16 matmul peak on this GPU; per variant, warm-up then the median step time over
`--steps` steps, real (non-padding) tokens/s (median of the steps' rates, and total tokens over total time),
MFU = 6 x parameters x real tokens/s against the measured peak and against the datasheet's dense bf16 peak,
peak GPU memory beside the preflight estimate. Writes one JSON record per run and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A 2-layer model, narrower: checks every variant's code path in seconds before the real runs.
SMOKE = {"num_hidden_layers": 2, "intermediate_size": 1024, "hidden_size": 1024, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 128}
CPU = {**SMOKE, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 256,
       "head_dim": 64}
# Dense bf16 peak by the vendor's datasheet (H100/H200 SXM: 989.4 TFLOP/s without sparsity).
DATASHEET_BF16 = {"H200": 989.4e12, "H100": 989.4e12}

# name -> config overrides on top of BASE (the mistral-7b-zero3 preset at world size 1, 2 rows per micro-step,
# no activation checkpointing, no accumulation), except "preset-1gpu", which is the shipped single-GPU preset
# `mistral-7b-zero3-1gpu` untouched. Padded variants use
# micro-batch 2 like the packed ones: padding 2 rows to the longest example is the same worst-case memory
# (2 x 2048 tokens), and a larger padded micro-batch runs out of memory whenever one example is long.
ACCUM = "batch.gradient_accumulation_steps=4"
BASE = ["batch.micro_batch_size=2", "model.activation_checkpointing=false", "batch.gradient_accumulation_steps=1"]
VARIANTS = {
    "preset-1gpu": [],
    "z2-packed-sdpa": ["deepspeed.stage=2", "data.packing=true", "model.attn_implementation=sdpa", ACCUM],
    "z2-packed-flex": ["deepspeed.stage=2", "data.packing=true", "model.attn_implementation=flex_attention", ACCUM],
    "z3-packed-sdpa": ["deepspeed.stage=3", "data.packing=true", "model.attn_implementation=sdpa", ACCUM],
    "z3-packed-flex": ["deepspeed.stage=3", "data.packing=true", "model.attn_implementation=flex_attention", ACCUM],
    "z2-padded-sdpa": ["deepspeed.stage=2", "data.packing=false", "model.attn_implementation=sdpa", ACCUM],
    "z3-padded-sdpa": ["deepspeed.stage=3", "data.packing=false", "model.attn_implementation=sdpa", ACCUM],
    "z3-packed-flex-accum8": ["deepspeed.stage=3", "data.packing=true", "model.attn_implementation=flex_attention",
                              "batch.gradient_accumulation_steps=8"],
    "z3-packed-flex-ac8": ["deepspeed.stage=3", "data.packing=true", "model.attn_implementation=flex_attention",
                           "model.activation_checkpointing=true", "batch.micro_batch_size=8",
                           "batch.gradient_accumulation_steps=2"],
    "z3-packed-flex-ac16": ["deepspeed.stage=3", "data.packing=true", "model.attn_implementation=flex_attention",
                            "model.activation_checkpointing=true", "batch.micro_batch_size=16"],
    "z3-packed-sdpa-ac4": ["deepspeed.stage=3", "data.packing=true", "model.activation_checkpointing=true",
                           "batch.micro_batch_size=4"],
    "z2-offload-packed-flex": ["deepspeed.stage=2", "deepspeed.offload_optimizer=true", "data.packing=true",
                               "model.attn_implementation=flex_attention", "batch.gradient_accumulation_steps=8"],
    # ZeRO-3 at world size 1 with every parameter persistent: nothing gathered per micro-step (issue 14's lever)
    "z3-persist-ac8": ["deepspeed.stage=3", "data.packing=true", "model.attn_implementation=flex_attention",
                       "model.activation_checkpointing=true", "batch.micro_batch_size=8",
                       "batch.gradient_accumulation_steps=2", "deepspeed.param_persistence_threshold=10000000000"],
    "z3-persist-noac": ["deepspeed.stage=3", "data.packing=true", "model.attn_implementation=flex_attention",
                        "batch.gradient_accumulation_steps=8", "deepspeed.param_persistence_threshold=10000000000"],
    # "1gpu-*": the shipped single-GPU preset plus one lever (issue 14). Selective activation checkpointing:
    # only the first N of 32 layers recompute, the others keep their activations in the memory the preset leaves
    "1gpu-sac-k26": ["model.activation_checkpointing_layers=26"],
    "1gpu-persist": ["deepspeed.param_persistence_threshold=10000000000"],  # the preset + persistence alone
    "1gpu-persist-sac-k26": ["model.activation_checkpointing_layers=26",
                             "deepspeed.param_persistence_threshold=10000000000"],
    "1gpu-sac4-k16": ["model.activation_checkpointing_layers=16", "batch.micro_batch_size=4",
                      "batch.gradient_accumulation_steps=4"],
    # Compiled model (model.compile): torch.compile through engine.compile() (fused RMSNorm/SwiGLU/RoPE between the
    # matmuls; ZeRO-3's hooks split the graph per module), or DeepSpeed's DeepCompile (the ZeRO-3 gathers compiled
    # into one graph; builds DeepSpeed's `dc` op with nvcc first). Warm-up must cover the compile: --warmup 5.
    "1gpu-compile": ["model.compile=torch"],
    "1gpu-compile-sac-k26": ["model.compile=torch", "model.activation_checkpointing_layers=26"],
    "1gpu-deepcompile": ["model.compile=deepcompile"],
    # LoRA / QLoRA (issue 25): the shipped presets untouched, then one lever each. MFU for these counts 6 x all
    # parameters, as for the full fine-tune; the frozen base needs no weight gradients (~4 x parameters of work).
    "lora-1gpu": [],
    "lora-1gpu-nodrop": ["lora.dropout=0.0"],   # no dropped-out input copies kept per adapted linear
    "lora-1gpu-compile": ["model.compile=torch"],
    "lora-1gpu-ac8": ["model.activation_checkpointing=true", "batch.micro_batch_size=8",
                      "batch.gradient_accumulation_steps=2"],
    "lora-1gpu-sac-k16-mb4": ["model.activation_checkpointing=true", "model.activation_checkpointing_layers=16",
                              "batch.micro_batch_size=4", "batch.gradient_accumulation_steps=4"],
    "qlora-24gb": [],
    "qlora-24gb-mb8": ["batch.micro_batch_size=8", "batch.gradient_accumulation_steps=2"],
}
# Variants run on a shipped preset (no BASE overrides) other than mistral-7b-zero3: by name prefix.
PRESET_OF = {"preset-1gpu": "mistral-7b-zero3-1gpu", "1gpu-": "mistral-7b-zero3-1gpu",
             "lora-1gpu": "mistral-7b-lora-1gpu", "qlora-24gb": "mistral-7b-qlora-24gb"}
DEFAULT_VARIANTS = "preset-1gpu,z3-packed-flex,z3-padded-sdpa,z2-packed-flex,z3-packed-sdpa"


def matmul_peak() -> float:
    """The measured bf16 matmul peak of GPU 0: the recipe's own measurement (trainer/mfu.py), 5 timed rounds."""
    import torch

    from trainer.mfu import measure_peak_flops

    return measure_peak_flops(torch.device("cuda", 0), torch.bfloat16, rounds=5)


def dolly_examples(tokenizer: str, n: int, max_length: int, seed: int) -> list[dict]:
    from trainer.data.synthetic import generate
    from trainer.prompt import PromptEncoder

    enc = PromptEncoder(tokenizer)
    records = generate(n, seed=seed, profile="dolly")
    out = []
    for r, e in zip(records, enc.encode_examples(records)):
        if len(e.input_ids) <= max_length:
            out.append({"id": str(len(out)), "input_ids": e.input_ids, "labels": e.labels})
    return out


def run_variant(args) -> dict:
    """Child process: one variant, printed as one JSON line."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from trainer import config as C
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    cpu = args.cpu  # a code-path check on a machine without a GPU (tiny numbers, no meaning)
    preset = next((v for k, v in PRESET_OF.items() if args.variant.startswith(k)), None)
    on_preset = preset is not None
    preset = preset or "mistral-7b-zero3"
    lora = preset in ("mistral-7b-lora-1gpu", "mistral-7b-qlora-24gb")
    base = [] if on_preset else BASE
    overrides = base + VARIANTS[args.variant] + [
        "scaling.num_workers=1", f"data.max_length={args.max_length}", "checkpoint.storage_path=/tmp/dolly-bench",
        f"checkpoint.run_name={args.variant}", f"model.path={args.model}",
        # the benchmark never saves: no volume check for full state (a LoRA checkpoint is small anyway)
        *([] if lora else ["checkpoint.save_optimizer_state=false"]),
        *args.override,
    ]
    if args.data:
        overrides.append(f"data.path={args.data}")
    if cpu:
        overrides += ["scaling.use_gpu=false", "model.precision=fp32", "model.attn_implementation=sdpa"]
    cfg = C.load(preset, overrides)
    from trainer import ds_ops

    ds_ops.prepare(cfg)
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    if not cpu:
        torch.cuda.set_device(0)

    # With --data, the recipe reads the prepared dir itself, as `dolly-train train` does.
    examples = None if args.data else dolly_examples(args.model, args.num_examples, args.max_length, args.seed)
    t0 = time.perf_counter()
    recipe = FullFinetuneRecipe(cfg, LocalContext("/tmp/dolly-bench"))
    recipe.setup(train_examples=examples, val_examples=[] if examples is not None else None)
    setup_s = time.perf_counter() - t0
    plan = recipe._plan(0)
    times, reals = [], []
    losses = []
    total = args.warmup + args.steps
    if total + 1 > recipe.steps_per_epoch:
        raise SystemExit(f"only {recipe.steps_per_epoch} steps of data; lower --steps or raise --num-examples")
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    for s in range(total):
        micro, global_labels, real = recipe.step_batches(plan, s)
        sync()
        t = time.perf_counter()
        out = recipe.train_step(micro, global_labels)
        losses.append(out["loss_scaled_sum"].item() / recipe.accum)  # the step is done when its loss is on the host
        sync()
        if s >= args.warmup:
            times.append(time.perf_counter() - t)
            reals.append(real)
    tps = sum(reals) / sum(times)
    breakdown = time_phases(recipe, plan, total, sync)
    tokens_per_row = args.max_length if cfg.data.packing else None
    return {
        "variant": args.variant,
        "preset": preset,
        "overrides": overrides,
        "deepspeed_config": recipe.ds_config,
        "parameters": recipe.n_params,
        "trainable_parameters": sum(p.numel() for p in recipe.engine.module.parameters() if p.requires_grad),
        "setup_s": setup_s,
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "real_tokens_per_step_mean": sum(reals) / len(reals),
        "real_tokens_per_s": tps,
        "real_tokens_per_s_median": statistics.median(r / t for r, t in zip(reals, times)),
        "losses": losses,
        "memory_estimate_gib": recipe.memory_estimate.total_gib,
        "packing_efficiency": plan.efficiency,
        "tokens_per_row": tokens_per_row,
        "phase_s": breakdown,
        "peak_gpu_mem_gib": 0.0 if cpu else torch.cuda.max_memory_allocated() / 2**30,
        "loss_last": out["loss_scaled_sum"].item() / (recipe.accum or 1),
    }


def time_phases(recipe, plan, step: int, sync) -> dict:
    """One more optimizer step with a sync around each phase: where the step's time goes."""
    import torch

    micro, global_labels, _ = recipe.step_batches(plan, step)
    W, A = recipe.ctx.world_size, recipe.accum
    scale = W * A / max(global_labels, 1)
    phases = {"forward": 0.0, "backward": 0.0, "optimizer_step": 0.0}
    for mb in micro:
        mb = {k: v.to(recipe.device) for k, v in mb.items()}
        sync(); t = time.perf_counter()
        loss, _ = recipe.engine(mb["input_ids"], mb["labels"], mb["position_ids"], mb["doc_ids"], scale)
        sync(); phases["forward"] += time.perf_counter() - t; t = time.perf_counter()
        recipe.engine.backward(loss)
        sync(); phases["backward"] += time.perf_counter() - t; t = time.perf_counter()
        recipe.engine.step()  # does the optimizer step only at the accumulation boundary
        sync(); phases["optimizer_step"] += time.perf_counter() - t
    del torch
    return phases


def environment() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "deepspeed"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "versions": versions}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: a random-init Mistral-7B-architecture folder written "
                   "once under --model-cache by `dolly-train init-model`)")
    p.add_argument("--model-cache", default="/tmp/dolly-bench/models", help="where the default model folder is kept")
    p.add_argument("--data", help="a `dolly-train prepare` dir (default: synthetic Dolly-profile records)")
    p.add_argument("--datasheet-tflops", type=float, help="dense bf16 peak for the second MFU (default: by GPU name)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--num-examples", type=int, default=15000, help="Dolly-length synthetic records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="2-layer model: check the code paths in seconds")
    p.add_argument("--cpu", action="store_true", help="run the variants' code paths on the CPU (no GPU; figures meaningless)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per variant")
    p.add_argument("--override", action="append", default=[], help="extra config override for every variant")
    p.add_argument("--out", default="docs/benchmarks", help="folder for the JSON record")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()

    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    import torch

    from trainer.tiny_model import init_model

    if not args.model:
        layers, extra = (None, {}) if not (args.smoke or args.cpu) else (2, CPU if args.cpu else SMOKE)
        kind = "cpu" if args.cpu else "smoke" if args.smoke else "mistral-7b"
        args.model = str(Path(args.model_cache) / kind)
        if not (Path(args.model) / "config.json").is_file():
            t = time.perf_counter()
            init_model(args.model, arch="mistral-7b", layers=layers,
                       dtype="float32" if args.cpu else "bfloat16", **extra)
            print(f"wrote {args.model} in {time.perf_counter() - t:.0f}s", flush=True)
    peak = 1e12 if args.cpu else matmul_peak()
    env = environment() if not args.cpu else {"gpu": "cpu", "gpu_count": 0, "cuda": None, "versions": {}}
    sheet = (args.datasheet_tflops * 1e12 if args.datasheet_tflops else
             next((v for k, v in DATASHEET_BF16.items() if k in env["gpu"]), None))
    print(f"{env['gpu']}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; datasheet "
          f"{sheet / 1e12 if sheet else float('nan'):.0f}", flush=True)
    results = []
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", name, "--model", args.model, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--max-length", str(args.max_length),
               "--num-examples", str(args.num_examples), "--seed", str(args.seed)]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--cpu"] if args.cpu else []
        cmd += ["--data", args.data] if args.data else []
        for o in args.override:
            cmd += ["--override", o]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line:
                r = json.loads(line[7:])
                r["mfu"] = 6 * r["parameters"] * r["real_tokens_per_s"] / peak  # against the measured peak
                r["mfu_datasheet"] = 6 * r["parameters"] * r["real_tokens_per_s"] / sheet if sheet else None
            else:
                tail = (proc.stdout + proc.stderr)[-3000:]
                oom = "out of memory" in tail.lower() or "OutOfMemoryError" in tail
                r = {"variant": name, "error": "out of GPU memory" if oom else f"exit {proc.returncode}", "log_tail": tail}
        except subprocess.TimeoutExpired as e:
            r = {"variant": name, "error": f"timed out after {args.timeout}s",
                 "log_tail": ((e.stdout or b"")[-2000:]).decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)[-2000:]}
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        summary = (f"{r['real_tokens_per_s']:,.0f} tok/s  MFU {r['mfu']:.1%}  {r['peak_gpu_mem_gib']:.1f} GiB"
                   if "error" not in r else r["error"])
        print(f"  {name:26s} {summary}  ({r['wall_s']:.0f}s)", flush=True)
        if "phase_s" in r:
            print("    phases: " + ", ".join(f"{k} {v:.3f}s" for k, v in r["phase_s"].items()), flush=True)
        if "error" in r:
            print(r["log_tail"][-1500:], flush=True)

    record = {"date": time.strftime("%Y-%m-%d"), **env, "matmul_peak_flops": peak, "datasheet_peak_flops": sheet,
              "model": args.model, "data": args.data, "smoke": args.smoke,
              "steps": args.steps, "warmup": args.warmup, "max_length": args.max_length, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_throughput_{time.strftime('%Y%m%d-%H%M%S')}{'_smoke' if args.smoke else ''}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)

    print(f"\n{'variant':26s} {'real tok/s':>11s} {'median':>8s} {'MFU':>6s} {'MFU ds':>6s} {'step s':>7s} "
          f"{'pack eff':>8s} {'GiB':>6s} {'est GiB':>7s}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:26s} {r['error']}")
        else:
            print(f"{r['variant']:26s} {r['real_tokens_per_s']:11,.0f} {r['real_tokens_per_s_median']:8,.0f} "
                  f"{r['mfu']:6.1%} {(r['mfu_datasheet'] or 0):6.1%} {r['median_step_s']:7.3f} "
                  f"{r['packing_efficiency']:8.3f} {r['peak_gpu_mem_gib']:6.1f} {r['memory_estimate_gib']:7.1f}")
    print(f"record: {path}")
    del torch
    return 0


if __name__ == "__main__":
    sys.exit(main())
