"""`dolly-eval compare BASE_DIR TUNED_DIR --out DIR`: paired deltas between two runs.

Each ROUGE F1 delta (tuned - base) is a mean over the same example ids, with a paired bootstrap interval
and a paired sign-flip permutation p-value (`evaluator.score.paired_bootstrap`), overall and per category.
Every (group, metric) cell is one test: (1 + categories) x 4 of them; `p_holm` is the Holm-Bonferroni
adjusted p-value over that whole family and the report says how many tests it covers. Two runs are
comparable only when they scored the same test split (sha256) with the same effective sampling settings,
the same ROUGE setup and the same prompts (the same max_model_len, so the same long prompts cut the same way);
anything else is refused (exit 2).

Every output opens with the answer (`headline`): the overall ROUGE-L F1 base -> tuned with the delta, its CI and
the Holm-corrected p-value in one sentence, then the categories whose ROUGE-L changed significantly (Holm p <
ALPHA); the full table follows.

compare.json (schema_version 2):
    base, tuned          {path, model_path, weights_sha256}
    test_sha256, sampling, scoring {resamples, seed, confidence, paired, test, permutations, comparisons,
                                    correction}   (compare's own options)
    overall              {rouge1|rouge2|rougeL|rougeLsum: {base, tuned, delta, ci_low, ci_high, p_value,
                                                          p_holm, n}}
    by_category          {category: same as overall}
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from evaluator.config import EvalInputError, ScoringConfig
from evaluator.report import (atomic_dir, bar_chart, check_out_dir, read_jsonl, write_json, write_report)
from evaluator.score import ROUGE_TYPES, average_over_seeds, holm, paired_bootstrap

SCHEMA_VERSION = 2
RUN_SCHEMA_VERSION = 2
CHART = "compare.png"
ALPHA = 0.05  # significance level of the headline's "significant" (on the Holm-corrected p-values)
HEADLINE_METRIC = "rougeL"


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
    if metrics.get("kind") != "dolly-eval/run":
        raise EvalInputError(f"{mpath}: not a dolly-eval run metrics file")
    if metrics.get("schema_version") != RUN_SCHEMA_VERSION:
        raise EvalInputError(f"{mpath}: schema_version {metrics.get('schema_version')}, expected "
                             f"{RUN_SCHEMA_VERSION} (runs before it scored rougeLsum without sentence splitting: "
                             f"run it again with this evaluator)")
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
    b_rouge, t_rouge = base.get("scoring", {}).get("rougeLsum"), tuned.get("scoring", {}).get("rougeLsum")
    if b_rouge != t_rouge:
        raise EvalInputError(f"refusing to compare: different ROUGE-Lsum sentence splitting: {base_dir} "
                             f"{b_rouge!r} vs {tuned_dir} {t_rouge!r}")
    if base["data"].get("limit") != tuned["data"].get("limit"):
        raise EvalInputError(f"refusing to compare: {base_dir} used limit {base['data'].get('limit')}, "
                             f"{tuned_dir} used {tuned['data'].get('limit')}")
    check_same_prompts(base, tuned, base_dir, tuned_dir)


def prompt_limit(metrics: dict) -> tuple[int | None, dict]:
    """(max_model_len the run's prompts were fitted to, or None for no limit; {id: kept context chars} of the
    prompts it cut). Runs before `max_model_len` was recorded there: max_prompt_tokens + max_new_tokens."""
    cut = metrics["data"].get("prompts_truncated") or {}
    limit = cut.get("max_model_len")
    if limit is None and cut.get("max_prompt_tokens") is not None:
        limit = cut["max_prompt_tokens"] + metrics["sampling"]["max_new_tokens"]
    return limit, {e["id"]: e.get("kept_context_chars") for e in cut.get("examples", [])}


def check_same_prompts(base: dict, tuned: dict, base_dir, tuned_dir) -> None:
    """The two models must have seen the same prompts: a different max_model_len cuts long prompts differently
    (or not at all), and the delta would then partly measure the prompts, not the models."""
    (b_len, b_cut), (t_len, t_cut) = prompt_limit(base), prompt_limit(tuned)
    show = lambda n: "none (the model's own limit unknown)" if n is None else n  # noqa: E731
    if b_len != t_len:
        raise EvalInputError(
            f"refusing to compare: different max_model_len: {base_dir} fitted its prompts to max_model_len "
            f"{show(b_len)} ({len(b_cut)} cut), {tuned_dir} to {show(t_len)} ({len(t_cut)} cut); run both with "
            f"the same --max-model-len")
    if b_cut != t_cut:
        diff = sorted(set(b_cut.items()) ^ set(t_cut.items()))
        raise EvalInputError(
            f"refusing to compare: the same max_model_len {show(b_len)} cut different prompts: {base_dir} cut "
            f"{len(b_cut)}, {tuned_dir} cut {len(t_cut)} (first difference: {diff[0][0]}); the two models' "
            f"tokenizers differ")


def paired_table(base_scores: dict, tuned_scores: dict, ids: list[str], boot: tuple) -> dict:
    return {t: paired_bootstrap([base_scores[i][t]["f1"] for i in ids], [tuned_scores[i][t]["f1"] for i in ids], *boot)
            for t in ROUGE_TYPES}


def add_holm(tables: list[dict]) -> int:
    """Holm-adjust the p-values of every (group, metric) cell of `tables` as one family; returns its size."""
    cells = [table[t] for table in tables for t in ROUGE_TYPES]
    for cell, adjusted in zip(cells, holm([c["p_value"] for c in cells])):
        cell["p_holm"] = adjusted
    return len(cells)


def compare(base_dir: str, tuned_dir: str, out_dir: str, scoring: ScoringConfig | None = None) -> dict:
    out = check_out_dir(out_dir)
    base, base_scores, cats = load_run(base_dir)
    tuned, tuned_scores, _ = load_run(tuned_dir)
    check_comparable(base, tuned, base_dir, tuned_dir)
    if set(base_scores) != set(tuned_scores):
        diff = sorted(set(base_scores) ^ set(tuned_scores))
        raise EvalInputError(f"refusing to compare: the runs scored different example ids (e.g. {diff[:3]})")
    sc = scoring or ScoringConfig()
    boot = (sc.bootstrap_resamples, sc.bootstrap_seed, sc.confidence, sc.permutations)
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
                    "paired": True, "test": "paired sign-flip permutation, two-sided",
                    "permutations": sc.permutations, "correction": "holm"},
        "overall": paired_table(base_scores, tuned_scores, ids, boot),
        "by_category": {c: paired_table(base_scores, tuned_scores, by_cat[c], boot) for c in sorted(by_cat)},
    }
    result["scoring"]["comparisons"] = add_holm([result["overall"], *result["by_category"].values()])
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
    side = {"path": str(Path(path).resolve()), "model_path": metrics["model"]["path"],
            "weights_sha256": metrics["model"]["weights_sha256"]}
    if metrics.get("adapter"):  # issue 25: a base + adapter run (vLLM's LoRA path) says which adapter
        side["adapter_path"] = metrics["adapter"]["path"]
        side["adapter_sha256"] = metrics["adapter"]["weights_sha256"]
        side["model_path"] += f" + adapter {metrics['adapter']['path']}"
    return side


def table_rows(result: dict) -> list[list]:
    rows = []
    for group, table in [("overall", result["overall"]), *result["by_category"].items()]:
        for t in ROUGE_TYPES:
            s = table[t]
            rows.append([group, t, s["n"], f"{s['base']:.4f}", f"{s['tuned']:.4f}", f"{s['delta']:+.4f}",
                         f"[{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]", f"{s['p_value']:.4f}", f"{s['p_holm']:.4f}"])
    return rows


HEADER = ["group", "metric", "n", "base F1", "tuned F1", "delta", "CI", "p", "p (Holm)"]


def tests_note(result: dict) -> str:
    sc = result["scoring"]
    groups = 1 + len(result["by_category"])
    return (f"p: two-sided paired sign-flip permutation test ({sc['permutations']} permutations), one test per "
            f"row: {sc['comparisons']} comparisons in all ({groups} groups (overall + {groups - 1} categories) x "
            f"{len(ROUGE_TYPES)} metrics), not independent (the metrics are correlated and the overall row contains "
            f"the categories). The p column is uncorrected; p (Holm) is Holm-Bonferroni adjusted over all "
            f"{sc['comparisons']}, controlling the family-wise error rate.")


def _p(p: float) -> str:
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}"


def headline(result: dict) -> list[str]:
    """The answer in two sentences: overall ROUGE-L base -> tuned, delta, CI, corrected p; then the categories
    that changed significantly."""
    s, sc, m = result["overall"][HEADLINE_METRIC], result["scoring"], HEADLINE_METRIC
    significant = s["p_holm"] < ALPHA
    verdict = (("fine-tuning helped" if s["delta"] > 0 else "fine-tuning made it worse") if significant
               else f"no significant difference at the {ALPHA:g} level")
    first = (f"Overall ROUGE-L F1 {s['base']:.4f} (base) -> {s['tuned']:.4f} (tuned): delta {s['delta']:+.4f}, "
             f"{sc['confidence']:.0%} CI [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}], {_p(s['p_holm'])} "
             f"(Holm-corrected over {sc['comparisons']} tests): {verdict}.")
    cats = {c: t[m] for c, t in result["by_category"].items() if t[m]["p_holm"] < ALPHA}
    better = [f"{c} ({t['delta']:+.3f})" for c, t in sorted(cats.items(), key=lambda x: -x[1]["delta"])
              if t["delta"] > 0]
    worse = [f"{c} ({t['delta']:+.3f})" for c, t in sorted(cats.items(), key=lambda x: x[1]["delta"])
             if t["delta"] < 0]
    if not better and not worse:
        second = (f"No category's ROUGE-L changed significantly (Holm p < {ALPHA:g}; "
                  f"{len(result['by_category'])} categories).")
    else:
        second = (f"Significantly better ROUGE-L (Holm p < {ALPHA:g}): {', '.join(better) or 'none'}; "
                  f"significantly worse: {', '.join(worse) or 'none'}.")
    return [first, second]


def compare_blocks(result: dict) -> list[tuple]:
    first, second = headline(result)
    return [
        ("h", 1, "dolly-eval compare"),
        ("p", first, "strong"),
        ("p", second),
        ("table", HEADER, table_rows(result)),
        ("p", tests_note(result)),
        ("img", CHART, "F1 delta by category"),
        ("p", f"base {result['base']['model_path']} vs tuned {result['tuned']['model_path']}, test split sha256 "
              f"{result['test_sha256'][:12]}, sampling {json.dumps(result['sampling'])}; deltas are tuned - base, "
              f"paired over example ids ({result['scoring']['resamples']} bootstrap resamples for the CI)."),
    ]


def format_table(result: dict, brief: bool = False) -> str:
    """The terminal's output: the headline, then the table (with `brief`, its overall rows only)."""
    rows = table_rows(result)
    if brief:
        rows = [r for r in rows if r[0] == "overall"]
    rows = [HEADER, *rows]
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(HEADER))]
    table = ["  ".join(str(c).ljust(w) if k < 2 else str(c).rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([*headline(result), *table, *([] if brief else [tests_note(result)])])
