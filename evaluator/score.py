"""ROUGE scoring and bootstrap confidence intervals.

Per-example scores come from `rouge_score.rouge_scorer.RougeScorer` itself (stemming on, as in the
Dolly/Alpaca evaluations); every reported mean is the plain mean of those numbers. Intervals are percentile
bootstrap intervals over examples (numpy, fixed seed); `paired_bootstrap` resamples example ids jointly for
two runs, so a compare's interval reflects the per-example differences rather than two independent spreads.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
PARTS = ("precision", "recall", "f1")


def make_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def score_pairs(references: list[str], predictions: list[str]) -> list[dict]:
    """[{rouge1: {precision, recall, f1}, ...}] per example; `score(target, prediction)` order as rouge-score."""
    scorer = make_scorer()
    out = []
    for ref, pred in zip(references, predictions, strict=True):
        s = scorer.score(ref, pred)
        # float(): rouge-score returns an int 0 for an empty prediction
        out.append({t: {"precision": float(s[t].precision), "recall": float(s[t].recall), "f1": float(s[t].fmeasure)}
                    for t in ROUGE_TYPES})
    return out


def bootstrap_ci(values, resamples: int, seed: int, confidence: float) -> dict:
    """Mean and percentile-bootstrap interval of `values` (one number per example)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)  # (resamples,)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(x.size)}


def paired_bootstrap(base, tuned, resamples: int, seed: int, confidence: float) -> dict:
    """Delta of means (tuned - base) over the same examples, its interval and a two-sided p-value.

    The p-value is the paired bootstrap test's: twice the smaller share of resampled deltas on either side
    of zero (with +1 smoothing so it is never exactly 0), capped at 1. Identical runs give delta 0, p = 1.
    """
    b, t = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if b.shape != t.shape or b.size == 0:
        raise ValueError(f"paired_bootstrap: need two equal, non-empty arrays, got {b.shape} and {t.shape}")
    d = t - b
    rng = np.random.default_rng(seed)
    deltas = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)  # (resamples,)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(deltas, [alpha, 1 - alpha])
    below = (np.sum(deltas <= 0) + 1) / (resamples + 1)
    above = (np.sum(deltas >= 0) + 1) / (resamples + 1)
    return {"base": float(b.mean()), "tuned": float(t.mean()), "delta": float(d.mean()),
            "ci_low": float(lo), "ci_high": float(hi), "p_value": float(min(1.0, 2 * min(below, above))),
            "n": int(d.size)}


def summarize(scores: list[dict], resamples: int, seed: int, confidence: float) -> dict:
    """{rouge1: {precision: {mean, ci_low, ci_high, n}, recall: ..., f1: ...}, ...} for one set of examples."""
    return {t: {p: bootstrap_ci([s[t][p] for s in scores], resamples, seed, confidence) for p in PARTS}
            for t in ROUGE_TYPES}


def by_category(categories: list[str], scores: list[dict], resamples: int, seed: int, confidence: float) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for cat, s in zip(categories, scores, strict=True):
        groups[cat].append(s)
    return {cat: summarize(groups[cat], resamples, seed, confidence) for cat in sorted(groups)}


def average_over_seeds(rows: list[dict]) -> dict[str, dict]:
    """Per example id: scores averaged over its generations (one for greedy runs, one per seed otherwise)."""
    acc: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        acc[r["id"]].append(r["scores"])
    return {i: {t: {p: float(np.mean([s[t][p] for s in ss])) for p in PARTS} for t in ROUGE_TYPES}
            for i, ss in acc.items()}
