"""`dolly-eval run`: check inputs -> encode prompts -> vLLM generate -> ROUGE -> write the run folder.

    dolly-eval run --model models/tiny --data data/synthetic --out eval/base --config evaluator/configs/cpu-tiny.yaml

Output folder (schema of metrics.json: evaluator/README.md):
    predictions.jsonl   one row per generation (one per test record, or per record and seed when sampling)
    metrics.json        schema_version 1: provenance (model/tokenizer/test-split hashes, vLLM version,
                        engine and sampling settings), ROUGE means + CIs overall and per category,
                        generation counts, token statistics and throughput
    report.md, report.html, by_category.png
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter

import numpy as np

from evaluator import __version__
from evaluator.config import EvalInputError, RunConfig
from evaluator.inputs import ModelInfo, TestSplit, check_lengths, check_model, read_test_split
from evaluator.report import atomic_dir, check_out_dir, run_blocks, run_chart, write_json, write_jsonl, write_report
from evaluator.score import ROUGE_TYPES, average_over_seeds, by_category, score_pairs, summarize
from trainer.prompt import prompt_text

log = logging.getLogger("dolly-eval")

METRICS_SCHEMA_VERSION = 1
CHART = "by_category.png"


def token_stats(counts: list[int]) -> dict:
    a = np.asarray(counts)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "max": int(a.max()), "total": int(a.sum())}


def prediction_rows(records, prompt_ids, gen_run, encoder) -> list[dict]:
    rows = []
    for g in gen_run.generations:
        rec = records[g.prompt_index]
        rows.append({
            "id": rec["id"], "category": rec["category"], "seed": g.seed,
            "prompt": prompt_text(rec["instruction"], rec["context"]), "reference": rec["response"].strip(),
            "prediction": encoder.decode(g.token_ids).strip(),
            "prompt_tokens": len(prompt_ids[g.prompt_index]), "output_tokens": len(g.token_ids),
            "finish_reason": g.finish_reason, "output_token_ids": g.token_ids,
        })
    scores = score_pairs([r["reference"] for r in rows], [r["prediction"] for r in rows])
    for r, s in zip(rows, scores):
        r["scores"] = s
    return rows


def build_metrics(cfg: RunConfig, model: ModelInfo, split: TestSplit, records: list[dict],
                  prompt_ids: list[list[int]], gen_run, rows: list[dict]) -> dict:
    sc = cfg.scoring
    boot = (sc.bootstrap_resamples, sc.bootstrap_seed, sc.confidence)
    per_example = average_over_seeds(rows)
    ids = [r["id"] for r in records]
    cats = [r["category"] for r in records]
    scores = [per_example[i] for i in ids]
    reasons = Counter(r["finish_reason"] for r in rows)
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "kind": "dolly-eval/run",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "evaluator_version": __version__,
        "model": model.record(),
        "data": {**split.record(), "limit": cfg.limit},
        "num_examples": len(records),
        "engine": {**cfg.engine.__dict__, "vllm_version": gen_run.vllm_version, "device": gen_run.device,
                   "llm_kwargs": gen_run.engine_kwargs},
        "sampling": cfg.sampling.effective(),
        "scoring": {"rouge_types": list(ROUGE_TYPES), "use_stemmer": True, "resamples": sc.bootstrap_resamples,
                    "seed": sc.bootstrap_seed, "confidence": sc.confidence},
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
    return metrics


def run(cfg: RunConfig) -> dict:
    # Every check that can fail on bad input runs before the engine starts.
    out = check_out_dir(cfg.out)
    model, encoder = check_model(cfg.model)
    split = read_test_split(cfg.data)
    for name, src in (("--model", model.path), ("--data", split.path.parent)):
        if src == out or out in src.parents:
            raise EvalInputError(f"--out {cfg.out}: would replace {name} {src}; choose another folder")
    records = split.records[: cfg.limit] if cfg.limit else split.records
    prompt_ids = encoder.encode_prompts(records)
    check_lengths(records, prompt_ids, cfg.engine.max_model_len or model.max_position_embeddings, split.path)
    log.info("%s: %d test records, model %s", split.path, len(records), model.path)

    from evaluator.generate import generate  # imports vLLM: only once the inputs are known to be good

    gen_run = generate(str(model.path), prompt_ids, [r["id"] for r in records], encoder.eos_id, cfg.engine,
                       cfg.sampling)
    rows = prediction_rows(records, prompt_ids, gen_run, encoder)
    metrics = build_metrics(cfg, model, split, records, prompt_ids, gen_run, rows)
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "predictions.jsonl", rows)
        run_chart(tmp / CHART, metrics)
        write_report(tmp, "report", run_blocks(metrics, rows, CHART), "dolly-eval run")
        write_json(tmp / "metrics.json", metrics)
    log.info("wrote %s", out)
    return metrics


def summary_table(metrics: dict) -> str:
    o = metrics["overall"]
    lines = [f"{'metric':<10} {'F1':>8} {'CI low':>8} {'CI high':>8}"]
    lines += [f"{t:<10} {o[t]['f1']['mean']:8.4f} {o[t]['f1']['ci_low']:8.4f} {o[t]['f1']['ci_high']:8.4f}"
              for t in ROUGE_TYPES]
    return "\n".join(lines)
