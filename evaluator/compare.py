"""`dolly-eval compare BASE_DIR TUNED_DIR --out DIR`: paired deltas between two runs.

Each ROUGE F1 delta (tuned - base) is a mean over the same example ids, with a paired bootstrap interval
and p-value (`evaluator.score.paired_bootstrap`), overall and per category. Two runs are comparable only
when they scored the same test split (sha256) with the same effective sampling settings; anything else
is refused (exit 2).

compare.json (schema_version 1):
    base, tuned          {path, model_path, weights_sha256}
    test_sha256, sampling, scoring {resamples, seed, confidence, paired}   (scoring: compare's own options)
    overall              {rouge1|rouge2|rougeL|rougeLsum: {base, tuned, delta, ci_low, ci_high, p_value, n}}
    by_category          {category: same as overall}
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from evaluator.config import EvalInputError, ScoringConfig
from evaluator.report import (atomic_dir, bar_chart, check_out_dir, read_jsonl, write_json, write_report)
from evaluator.score import ROUGE_TYPES, average_over_seeds, paired_bootstrap

SCHEMA_VERSION = 1
CHART = "compare.png"


def load_run(run_dir: str | Path) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """metrics.json, per-id scores (averaged over seeds) and per-id categories of one `dolly-eval run`."""
    d = Path(run_dir)
    if not d.is_dir():
        raise EvalInputError(f"{run_dir}: no such run directory")
    mpath = d / "metrics.json"
    try:
        metrics = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise EvalInputError(f"{mpath}: missing (not a finished `dolly-eval run` output)") from None
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{mpath}: not valid JSON ({e})") from e
    if metrics.get("schema_version") != 1 or metrics.get("kind") != "dolly-eval/run":
        raise EvalInputError(f"{mpath}: not a dolly-eval run metrics file with schema_version 1")
    ppath = d / "predictions.jsonl"
    if not ppath.is_file():
        raise EvalInputError(f"{ppath}: missing")
    rows = read_jsonl(ppath)
    return metrics, average_over_seeds(rows), {r["id"]: r["category"] for r in rows}


def check_comparable(base: dict, tuned: dict, base_dir, tuned_dir) -> None:
    b, t = base["data"]["test_sha256"], tuned["data"]["test_sha256"]
    if b != t:
        raise EvalInputError(f"refusing to compare: {base_dir} scored test split sha256 {b[:12]}..., "
                             f"{tuned_dir} scored {t[:12]}... (different test splits)")
    if base["sampling"] != tuned["sampling"]:
        raise EvalInputError(f"refusing to compare: different sampling settings: {base_dir} "
                             f"{json.dumps(base['sampling'])} vs {tuned_dir} {json.dumps(tuned['sampling'])}")
    if base["data"].get("limit") != tuned["data"].get("limit"):
        raise EvalInputError(f"refusing to compare: {base_dir} used limit {base['data'].get('limit')}, "
                             f"{tuned_dir} used {tuned['data'].get('limit')}")


def paired_table(base_scores: dict, tuned_scores: dict, ids: list[str], boot: tuple) -> dict:
    return {t: paired_bootstrap([base_scores[i][t]["f1"] for i in ids], [tuned_scores[i][t]["f1"] for i in ids], *boot)
            for t in ROUGE_TYPES}


def compare(base_dir: str, tuned_dir: str, out_dir: str, scoring: ScoringConfig | None = None) -> dict:
    out = check_out_dir(out_dir)
    base, base_scores, cats = load_run(base_dir)
    tuned, tuned_scores, _ = load_run(tuned_dir)
    check_comparable(base, tuned, base_dir, tuned_dir)
    if set(base_scores) != set(tuned_scores):
        diff = sorted(set(base_scores) ^ set(tuned_scores))
        raise EvalInputError(f"refusing to compare: the runs scored different example ids (e.g. {diff[:3]})")
    sc = scoring or ScoringConfig()
    boot = (sc.bootstrap_resamples, sc.bootstrap_seed, sc.confidence)
    ids = sorted(base_scores)
    by_cat: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        by_cat[cats[i]].append(i)
    result = {
        "schema_version": SCHEMA_VERSION,
        "kind": "dolly-eval/compare",
        "base": _side(base_dir, base), "tuned": _side(tuned_dir, tuned),
        "test_sha256": base["data"]["test_sha256"], "sampling": base["sampling"],
        "scoring": {"resamples": sc.bootstrap_resamples, "seed": sc.bootstrap_seed, "confidence": sc.confidence,
                    "paired": True},
        "overall": paired_table(base_scores, tuned_scores, ids, boot),
        "by_category": {c: paired_table(base_scores, tuned_scores, by_cat[c], boot) for c in sorted(by_cat)},
    }
    with atomic_dir(out) as tmp:
        groups = ["overall", *result["by_category"]]
        rows = {"overall": result["overall"], **result["by_category"]}
        series = {t: [(rows[g][t]["delta"], rows[g][t]["ci_low"], rows[g][t]["ci_high"]) for g in groups]
                  for t in ROUGE_TYPES}
        bar_chart(tmp / CHART, groups, series, f"F1 delta, tuned - base ({sc.confidence:.0%} paired bootstrap CI)",
                  "delta F1")
        write_report(tmp, "compare", compare_blocks(result), "dolly-eval compare")
        write_json(tmp / "compare.json", result)
    return result


def _side(path: str, metrics: dict) -> dict:
    return {"path": str(Path(path).resolve()), "model_path": metrics["model"]["path"],
            "weights_sha256": metrics["model"]["weights_sha256"]}


def table_rows(result: dict) -> list[list]:
    rows = []
    for group, table in [("overall", result["overall"]), *result["by_category"].items()]:
        for t in ROUGE_TYPES:
            s = table[t]
            rows.append([group, t, s["n"], f"{s['base']:.4f}", f"{s['tuned']:.4f}", f"{s['delta']:+.4f}",
                         f"[{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]", f"{s['p_value']:.4f}"])
    return rows


HEADER = ["group", "metric", "n", "base F1", "tuned F1", "delta", "CI", "p"]


def compare_blocks(result: dict) -> list[tuple]:
    return [
        ("h", 1, "dolly-eval compare"),
        ("p", f"base {result['base']['model_path']} vs tuned {result['tuned']['model_path']}, test split sha256 "
              f"{result['test_sha256'][:12]}, sampling {json.dumps(result['sampling'])}; deltas are tuned - base, "
              f"paired over example ids ({result['scoring']['resamples']} bootstrap resamples)."),
        ("table", HEADER, table_rows(result)),
        ("img", CHART, "F1 delta by category"),
    ]


def format_table(result: dict) -> str:
    rows = [HEADER, *table_rows(result)]
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(HEADER))]
    return "\n".join("  ".join(str(c).ljust(w) if k < 2 else str(c).rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
