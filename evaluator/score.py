"""ROUGE scoring, bootstrap confidence intervals and the paired test of `compare`.

Per-example scores come from `rouge_score.rouge_scorer.RougeScorer` itself (stemming on, as in the
Dolly/Alpaca evaluations); every reported mean is the plain mean of those numbers. Intervals are percentile
bootstrap intervals over examples (numpy, fixed seed); `paired_bootstrap` resamples example ids jointly for
two runs, so a compare's interval reflects the per-example differences rather than two independent spreads,
and its p-value comes from a paired sign-flip permutation test (valid under the null of no difference).

ROUGE-Lsum is summary-level LCS over *lines*: rouge-score splits on "\n" only (its `split_summaries` option
calls nltk's `sent_tokenize`, which needs the punkt data and ignores existing line breaks). So texts are put
one sentence per line first (`sentence_lines`: each line split into sentences by `sentencex`, a rule-based
segmenter without data files), and rouge-score's rougeLsum scores those. rouge1/rouge2/rougeL score the
texts as written (their tokens ignore line breaks).

`score_pairs(..., workers=N)` scores in N processes; chunks are scored by the same code and concatenated in
order, so the numbers are identical to the serial ones.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version

import numpy as np
import sentencex
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
PARTS = ("precision", "recall", "f1")
SENTENCE_SPLITTER = f"sentencex {version('sentencex')} (en) within each line"
MIN_PAIRS_PER_WORKER = 64  # below this a worker costs more to start than it saves


def sentence_lines(text: str) -> str:
    """One sentence per line, the input rouge-score's rougeLsum expects: existing line breaks are kept,
    each line is split into sentences, and blank lines are dropped."""
    out = []
    for line in text.split("\n"):
        out += [s.strip() for s in sentencex.segment("en", line) if s.strip()]
    return "\n".join(out)


def make_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _score_chunk(pairs: list[tuple[str, str]]) -> list[dict]:
    flat = rouge_scorer.RougeScorer([t for t in ROUGE_TYPES if t != "rougeLsum"], use_stemmer=True)
    lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    out = []
    for ref, pred in pairs:
        s = {**flat.score(ref, pred), **lsum.score(sentence_lines(ref), sentence_lines(pred))}
        # float(): rouge-score returns an int 0 for an empty prediction
        out.append({t: {"precision": float(s[t].precision), "recall": float(s[t].recall), "f1": float(s[t].fmeasure)}
                    for t in ROUGE_TYPES})
    return out


def default_workers() -> int:
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _pool_context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["evaluator.score"])
    return ctx


def prestart_workers() -> None:
    """Start the forkserver (which imports rouge-score, nltk and sentencex once) ahead of scoring, e.g. while
    vLLM generates; `score_pairs` then forks its workers from it."""
    from multiprocessing import forkserver

    _pool_context()
    forkserver.ensure_running()


def score_pairs(references: list[str], predictions: list[str], workers: int = 1) -> list[dict]:
    """[{rouge1: {precision, recall, f1}, ...}] per example; `score(target, prediction)` order as rouge-score.

    workers > 1 scores contiguous chunks in that many processes (a forkserver whose server has imported
    this module, so workers start in milliseconds and never inherit a vLLM parent's threads)."""
    pairs = list(zip(references, predictions, strict=True))
    workers = max(1, min(workers, len(pairs) // MIN_PAIRS_PER_WORKER))
    if workers == 1:
        return _score_chunk(pairs)
    # Several chunks per worker so that one slow chunk (long texts) does not leave the others idle.
    size = -(-len(pairs) // (4 * workers))
    chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        return [s for part in pool.map(_score_chunk, chunks) for s in part]


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


def paired_bootstrap(base, tuned, resamples: int, seed: int, confidence: float, permutations: int = 10000) -> dict:
    """Delta of means (tuned - base) over the same examples, its paired bootstrap interval and a two-sided
    p-value from a paired sign-flip permutation test.

    Under the null (no difference between the runs) each example's pair is exchangeable, so the sign of
    each per-example delta is a fair coin: p = (1 + #{|mean of sign-flipped deltas| >= |observed mean|}) /
    (permutations + 1). That is valid under the null (P(p <= a) <= a), unlike reading the p-value off a
    bootstrap distribution centred on the observed delta. Identical runs give delta 0 and p = 1.
    """
    b, t = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if b.shape != t.shape or b.size == 0:
        raise ValueError(f"paired_bootstrap: need two equal, non-empty arrays, got {b.shape} and {t.shape}")
    d = t - b
    rng = np.random.default_rng(seed)
    deltas = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)  # (resamples,)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(deltas, [alpha, 1 - alpha])
    return {"base": float(b.mean()), "tuned": float(t.mean()), "delta": float(d.mean()),
            "ci_low": float(lo), "ci_high": float(hi), "p_value": sign_flip_p_value(d, permutations, seed),
            "n": int(d.size)}


def sign_flip_p_value(d, permutations: int, seed: int, batch: int = 1000) -> float:
    """Two-sided paired permutation test of mean(d) = 0 (random sign flips, +1 smoothed)."""
    d = np.asarray(d, dtype=np.float64)
    observed = abs(d.mean())
    rng = np.random.default_rng([seed, 1])  # a stream of its own, apart from the bootstrap's
    hits, done = 0, 0
    while done < permutations:
        k = min(batch, permutations - done)
        signs = rng.integers(0, 2, size=(k, d.size), dtype=np.int8) * 2 - 1  # (k, n) of +-1
        means = np.abs(signs @ d) / d.size
        # a relative tolerance: flipped means equal to the observed one up to rounding count as "as extreme"
        hits += int(np.sum(means >= observed - 1e-12 * max(1.0, observed)))
        done += k
    return float((hits + 1) / (permutations + 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


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
