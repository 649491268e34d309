"""`dolly-eval run`: check inputs -> fit prompts -> vLLM generate -> ROUGE -> write the run folder.

    dolly-eval run --model models/tiny --data data/synthetic --out eval/base --config evaluator/configs/cpu-tiny.yaml

Output folder (schema of metrics.json: evaluator/README.md):
    predictions.jsonl   one row per generation (one per test record, or per record and seed when sampling)
    metrics.json        schema_version 2: provenance (model/tokenizer/test-split hashes, vLLM version,
                        engine and sampling settings), ROUGE means + CIs overall and per category,
                        generation counts, token statistics, throughput and time per phase
    report.md, report.html, by_category.png
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from evaluator import __version__
from evaluator.config import EvalInputError, RunConfig
from evaluator.console import QuietRun, engine_changes, keep_log
from evaluator.generate import in_process
from evaluator.inputs import ModelInfo, TestSplit, check_model, fit_prompts, read_test_split
from evaluator.protocols import check_protocol_records, protocol_record
from evaluator.report import atomic_dir, check_out_dir, run_blocks, run_chart, write_json, write_jsonl, write_report
from evaluator.score import (ROUGE_TYPES, SENTENCE_SPLITTER, average_over_seeds, by_category, default_workers,
                             prestart_workers, score_pairs, summarize)
from trainer.prompt import prompt_text

log = logging.getLogger("dolly-eval")

METRICS_SCHEMA_VERSION = 2
CHART = "by_category.png"


def token_stats(counts: list[int]) -> dict:
    a = np.asarray(counts)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "max": int(a.max()), "total": int(a.sum())}


def prediction_rows(records, prompt_ids, gen_run, encoder, truncated_ids=frozenset(), prompts=None,
                    workers: int = 1) -> list[dict]:
    rows = []
    for g in gen_run.generations:
        rec = records[g.prompt_index]
        rows.append({
            "id": rec["id"], "category": rec["category"], "seed": g.seed,
            "prompt": prompts[g.prompt_index] if prompts else prompt_text(rec["instruction"], rec["context"]),
            "prompt_truncated": rec["id"] in truncated_ids, "reference": rec["response"].strip(),
            "prediction": encoder.decode(g.token_ids).strip(),
            "prompt_tokens": len(prompt_ids[g.prompt_index]), "output_tokens": len(g.token_ids),
            "finish_reason": g.finish_reason, "output_token_ids": g.token_ids,
        })
    scores = score_pairs([r["reference"] for r in rows], [r["prediction"] for r in rows], workers=workers)
    for r, s in zip(rows, scores):
        r["scores"] = s
    return rows


def build_metrics(cfg: RunConfig, model: ModelInfo, split: TestSplit, records: list[dict],
                  prompt_ids: list[list[int]], gen_run, rows: list[dict], truncated: dict | None = None) -> dict:
    sc = cfg.scoring
    boot = (sc.bootstrap_resamples, sc.bootstrap_seed, sc.confidence)
    per_example = average_over_seeds(rows)
    ids = [r["id"] for r in records]
    cats = [r["category"] for r in records]
    scores = [per_example[i] for i in ids]
    reasons = Counter(r["finish_reason"] for r in rows)
    truncated = truncated or {"count": 0, "max_prompt_tokens": None, "max_model_len": None, "examples": []}
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "kind": "dolly-eval/run",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "evaluator_version": __version__,
        "model": model.record(),
        "data": {**split.record(), "limit": cfg.limit, "prompts_truncated": truncated},
        "num_examples": len(records),
        "engine": {**cfg.engine.__dict__, "in_process": in_process(cfg.engine, gen_run.device),
                   "vllm_version": gen_run.vllm_version, "device": gen_run.device,
                   "llm_kwargs": gen_run.engine_kwargs, "cache": gen_run.cache,
                   "data_parallel_engines": gen_run.data_parallel},
        "sampling": cfg.sampling.effective(),
        "scoring": {"rouge_types": list(ROUGE_TYPES), "use_stemmer": True, "rougeLsum": SENTENCE_SPLITTER,
                    "resamples": sc.bootstrap_resamples, "seed": sc.bootstrap_seed, "confidence": sc.confidence},
        "overall": summarize(scores, *boot),
        "by_category": by_category(cats, scores, *boot),
        "generation": {
            "generations": len(rows),
            "finish_reasons": dict(sorted(reasons.items())),
            "empty_predictions": sum(1 for r in rows if not r["prediction"]),
            "truncated": reasons.get("length", 0),
            "prompt_tokens": token_stats([len(p) for p in prompt_ids]),
            "output_tokens": token_stats([r["output_tokens"] for r in rows]),
            "throughput": gen_run.throughput(),
        },
    }
    if not cfg.sampling.greedy:
        metrics["per_seed"] = {
            str(s): {t: float(np.mean([r["scores"][t]["f1"] for r in rows if r["seed"] == s])) for t in ROUGE_TYPES}
            for s in cfg.sampling.seeds}
    if cfg.protocol != "none":
        metrics["protocol"] = protocol_record(cfg.protocol, metrics)
    return metrics


def _preload_report_modules() -> None:
    """Import matplotlib (building its font cache when MPLCONFIGDIR holds none) while the engine starts."""
    from evaluator.report import _plt

    _plt()


def _generate(cfg: RunConfig, model: ModelInfo, prompt_ids, example_ids, eos_id: int, workers: int, engine,
              timings: dict, adapter: dict | None = None):
    """Engine start and generation, with the background work (weight hashing, matplotlib's import and font
    cache, the scoring workers' server) running beside the engine start and joined before generation begins,
    so that it never competes with vLLM's output processing for the GIL while it generates."""
    t0 = time.perf_counter()
    import vllm  # noqa: F401  (imported here, once the inputs are known to be good; timed as its own phase)

    from evaluator.adapter import lora_request
    from evaluator.generate import GenerationRun, generate, generate_with, shutdown, start_engine

    timings["vllm_import_seconds"] = time.perf_counter() - t0
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="dolly-eval-bg") as background:
        jobs = [background.submit(model.hash_weights), background.submit(_preload_report_modules)]
        if workers > 1:
            jobs.append(background.submit(prestart_workers))

        def join() -> None:
            t = time.perf_counter()
            timings["hash_seconds"] = jobs[0].result()
            for job in jobs[1:]:
                job.result()
            timings["background_wait_seconds"] = time.perf_counter() - t

        if cfg.engine.data_parallel_size > 1 and engine is None:  # engines in their own processes: no GIL to share
            gen_run = generate(str(model.path), prompt_ids, example_ids, eos_id, cfg.engine, cfg.sampling)
            join()
        else:
            eng = engine or start_engine(str(model.path), cfg.engine, adapter)
            for change in engine_changes(eng.llm, eng.kwargs):
                log.warning(change)
            try:
                join()
                gens, seconds = generate_with(eng.llm, prompt_ids, example_ids, eos_id, cfg.sampling,
                                              lora_request(adapter) if adapter else None)
            finally:
                if engine is None:
                    shutdown(eng.llm)
            gen_run = GenerationRun(gens, 0.0 if engine else eng.start_s, seconds, eng.device, eng.vllm_version,
                                    eng.kwargs, eng.cache)
    timings["engine_start_seconds"] = gen_run.engine_start_s
    timings["generate_seconds"] = gen_run.generate_s
    return gen_run


def run(cfg: RunConfig, engine=None, quiet: QuietRun | None = None) -> dict:
    """The whole `dolly-eval run`. `engine`: an already started `evaluator.generate.Engine` to generate with
    (bench/eval_speed.py shares one between raw vLLM and this path); the caller shuts it down. `quiet`: the
    terminal is quiet (evaluator/console.py): the log joins the run folder, vLLM's warnings are summed up."""
    t_run = time.perf_counter()
    timings: dict[str, float] = {}
    # Every check that can fail on bad input runs before the engine starts.
    out = check_out_dir(cfg.out)
    model, encoder = check_model(cfg.model, hash_weights=False)
    adapter = None
    if cfg.adapter:  # issue 25: base + adapter through vLLM's LoRA support
        from evaluator.adapter import check_adapter

        adapter = check_adapter(cfg.adapter)
        if cfg.engine.data_parallel_size > 1:
            raise EvalInputError("--adapter: not with engine.data_parallel_size > 1 (one engine here); "
                                 "score the merged export instead")
    split = read_test_split(cfg.data)
    for name, src in (("--model", model.path), ("--data", split.path.parent)):
        if src == out or out in src.parents:
            raise EvalInputError(f"--out {cfg.out}: would replace {name} {src}; choose another folder")
    records = split.records[: cfg.limit] if cfg.limit else split.records
    if cfg.protocol != "none":
        check_protocol_records(cfg, records, split.path)
    max_model_len = cfg.engine.max_model_len or model.max_position_embeddings
    prompt_ids, truncated = fit_prompts(records, encoder, max_model_len, cfg.sampling.max_new_tokens, split.path)
    if truncated:
        log.warning("%d test prompt(s) longer than max_model_len %s - max_new_tokens %d: their context was cut "
                    "(listed in metrics.json data.prompts_truncated)", len(truncated), max_model_len,
                    cfg.sampling.max_new_tokens)
    log.info("%s: %d test records, model %s", split.path, len(records), model.path)
    timings["inputs_seconds"] = time.perf_counter() - t_run

    workers = cfg.scoring.workers or default_workers()
    gen_run = _generate(cfg, model, prompt_ids, [r["id"] for r in records], encoder.eos_id, workers, engine, timings,
                        adapter)
    t0 = time.perf_counter()
    cut = {t["id"]: t["kept_context_chars"] for t in truncated}
    prompts = [prompt_text(r["instruction"], r["context"].strip()[: cut[r["id"]]] if r["id"] in cut else r["context"])
               for r in records]
    rows = prediction_rows(records, prompt_ids, gen_run, encoder, frozenset(cut), prompts, workers)
    cut_record = {"count": len(truncated), "examples": truncated, "max_model_len": max_model_len,
                  "max_prompt_tokens": None if max_model_len is None else max_model_len - cfg.sampling.max_new_tokens}
    metrics = build_metrics(cfg, model, split, records, prompt_ids, gen_run, rows, cut_record)
    if adapter:
        metrics["adapter"] = adapter
    timings["score_seconds"] = time.perf_counter() - t0
    with atomic_dir(out) as tmp:
        t0 = time.perf_counter()
        write_jsonl(tmp / "predictions.jsonl", rows)
        run_chart(tmp / CHART, metrics)
        timings["report_seconds"] = time.perf_counter() - t0
        timings["total_seconds"] = time.perf_counter() - t_run
        metrics["timings"] = {"scoring_workers": workers, "hash_in_background": True,
                              **{k: round(v, 3) for k, v in timings.items()}}
        write_report(tmp, "report", run_blocks(metrics, rows, CHART), "dolly-eval run")
        write_json(tmp / "metrics.json", metrics)
        keep_log(quiet, tmp)
    if quiet is not None:
        for said in quiet.warnings.notable:
            log.warning(said)
        n = quiet.warnings.count
        log.info("wrote %s (full log: %s%s)", out, quiet.final, f", {n} vLLM warning lines" if n else "")
    else:
        log.info("wrote %s", out)
    return metrics


def summary_table(metrics: dict) -> str:
    o = metrics["overall"]
    lines = [f"{'metric':<10} {'F1':>8} {'CI low':>8} {'CI high':>8}"]
    lines += [f"{t:<10} {o[t]['f1']['mean']:8.4f} {o[t]['f1']['ci_low']:8.4f} {o[t]['f1']['ci_high']:8.4f}"
              for t in ROUGE_TYPES]
    if "timings" in metrics:
        lines.append("seconds: " + ", ".join(f"{k.removesuffix('_seconds').replace('_', ' ')} {v:.1f}"
                                             for k, v in metrics["timings"].items() if k.endswith("_seconds")))
    if "protocol" in metrics:
        lines.append(metrics["protocol"]["statement"])
    return "\n".join(lines)
