"""ROUGE scoring and bootstrap statistics of the evaluator, checked against rouge-score itself and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer

from evaluator.score import (ROUGE_TYPES, average_over_seeds, bootstrap_ci, by_category, holm, paired_bootstrap,
                             score_pairs, sentence_lines, sign_flip_p_value, summarize)

REFS = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Photosynthesis turns light into chemical energy.\nPlants store it as sugar.",
    "A haiku has three lines of five, seven and five syllables.",
]
PREDS = [
    "the cat sat",
    "The capital of France is Paris.",
    "It boils at one hundred degrees.",
    "Plants turn light into sugar.\nThey store chemical energy.",
    "",
]


def test_means_equal_mean_of_rouge_score_per_example_f1():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    # rougeLsum from rouge-score on the texts put one sentence per line (none of these has two on a line)
    own = [{**scorer.score(r, p), "rougeLsum": scorer.score(sentence_lines(r), sentence_lines(p))["rougeLsum"]}
           for r, p in zip(REFS, PREDS)]
    summary = summarize(score_pairs(REFS, PREDS), resamples=200, seed=0, confidence=0.95)
    for t in ROUGE_TYPES:
        assert summary[t]["f1"]["mean"] == pytest.approx(np.mean([s[t].fmeasure for s in own]), abs=1e-12)
        assert summary[t]["precision"]["mean"] == pytest.approx(np.mean([s[t].precision for s in own]), abs=1e-12)
        assert summary[t]["recall"]["mean"] == pytest.approx(np.mean([s[t].recall for s in own]), abs=1e-12)
        assert summary[t]["f1"]["n"] == len(REFS)


def test_prediction_equal_to_reference_scores_one():
    for s in score_pairs(REFS, REFS):
        for t in ROUGE_TYPES:
            assert s[t] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_hand_computed_cases():
    # ref 6 tokens, pred 3 tokens all in ref: P 1, R 1/2, F 2/3; bigrams: 2 of pred's 2 in ref's 5.
    s = score_pairs(["the cat sat on the mat"], ["the cat sat"])[0]
    assert s["rouge1"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    assert s["rouge2"] == pytest.approx({"precision": 1.0, "recall": 0.4, "f1": 2 * 0.4 / 1.4})
    assert s["rougeL"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    # Reordered words: unigrams all match; the LCS is "the cat" (or "sat down"), 2 of 4 tokens.
    s = score_pairs(["the cat sat down"], ["sat down the cat"])[0]
    assert s["rouge1"]["f1"] == pytest.approx(1.0)
    assert s["rougeL"]["f1"] == pytest.approx(0.5)
    # Stemming (porter): runs/running -> run; case and punctuation are dropped by rouge-score's tokenizer.
    assert score_pairs(["He runs fast!"], ["he Running, fast"])[0]["rouge1"]["f1"] == pytest.approx(1.0)
    # An empty prediction scores 0, it does not crash or get skipped.
    assert score_pairs(["something"], [""])[0]["rougeL"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # rougeLsum works per line: each reference line's LCS union.
    s = score_pairs(["a b c\nd e f"], ["d e f\na b c"])[0]
    assert s["rougeLsum"]["f1"] == pytest.approx(1.0) and s["rougeL"]["f1"] == pytest.approx(0.5)


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    x = np.random.default_rng(1).beta(2, 5, size=300)
    a = bootstrap_ci(x, resamples=1000, seed=0, confidence=0.95)
    assert a["ci_low"] < a["mean"] < a["ci_high"]
    assert a["mean"] == pytest.approx(x.mean())
    # The standard error of a mean of 300 beta(2,5) draws is ~0.0092: a 95% interval spans about 0.036.
    assert 0.025 < a["ci_high"] - a["ci_low"] < 0.05
    assert bootstrap_ci(x, 1000, 0, 0.95) == a
    assert bootstrap_ci(x, 1000, 1, 0.95) != a
    const = bootstrap_ci([0.5] * 10, 1000, 0, 0.95)
    assert const["ci_low"] == const["mean"] == const["ci_high"] == 0.5


def test_paired_bootstrap_identical_runs_give_zero_delta():
    x = np.random.default_rng(2).uniform(size=100)
    r = paired_bootstrap(x, x.copy(), resamples=1000, seed=0, confidence=0.95)
    assert r["delta"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["p_value"] == 1.0


def test_paired_bootstrap_detects_a_consistent_gain_that_an_unpaired_view_would_blur():
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, size=80)  # wide spread between examples
    tuned = base + 0.03 + rng.normal(0, 0.01, size=80)  # small but consistent per-example gain
    r = paired_bootstrap(base, tuned, resamples=1000, seed=0, confidence=0.95)
    assert r["delta"] == pytest.approx((tuned - base).mean())
    assert 0 < r["ci_low"] < r["delta"] < r["ci_high"]
    assert r["p_value"] < 0.01
    # The two runs' own intervals overlap: only pairing shows the gain.
    b, t = bootstrap_ci(base, 1000, 0, 0.95), bootstrap_ci(tuned, 1000, 0, 0.95)
    assert t["ci_low"] < b["ci_high"]
    worse = paired_bootstrap(tuned, base, 1000, 0, 0.95)
    assert worse["delta"] < 0 and worse["ci_high"] < 0 and worse["p_value"] < 0.01


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([0.1, 0.2], [0.1], 100, 0, 0.95)


def test_by_category_and_seed_averaging():
    scores = score_pairs(REFS, PREDS)
    cats = ["a", "b", "a", "b", "a"]
    out = by_category(cats, scores, 200, 0, 0.95)
    assert sorted(out) == ["a", "b"]
    assert out["a"]["rougeL"]["f1"]["n"] == 3
    assert out["a"]["rougeL"]["f1"]["mean"] == pytest.approx(np.mean([scores[i]["rougeL"]["f1"] for i in (0, 2, 4)]))
    rows = [{"id": "x", "scores": scores[0]}, {"id": "x", "scores": scores[1]}, {"id": "y", "scores": scores[2]}]
    avg = average_over_seeds(rows)
    assert avg["x"]["rouge1"]["f1"] == pytest.approx((scores[0]["rouge1"]["f1"] + scores[1]["rouge1"]["f1"]) / 2)
    assert avg["y"] == scores[2]


# ---- ROUGE-Lsum: one sentence per line ----------------------------------------------------------------

MULTI_REF = ("The Eiffel Tower is in Paris. It was finished in 1889. Gustave Eiffel's company built it.\n"
             "It is 330 metres tall.")
MULTI_PRED = "Gustave Eiffel's company built the tower. It is in Paris and was finished in 1889. It is tall."


def test_sentence_lines_splits_sentences_and_keeps_line_breaks():
    assert sentence_lines(MULTI_REF).split("\n") == [
        "The Eiffel Tower is in Paris.", "It was finished in 1889.", "Gustave Eiffel's company built it.",
        "It is 330 metres tall."]
    assert sentence_lines("Prices rose 3.5% in 2023! Was it expected?  \n\n  Yes.") == \
        "Prices rose 3.5% in 2023!\nWas it expected?\nYes."
    assert sentence_lines("") == "" and sentence_lines("no full stop") == "no full stop"


def test_rouge_lsum_is_rouge_scores_own_on_one_sentence_per_line():
    """Multi-sentence texts: our rougeLsum equals rouge-score's rougeLsum on the same texts written one sentence
    per line by hand, and differs from rougeL (before the fix it was rougeL under another name)."""
    by_hand_ref = ("The Eiffel Tower is in Paris.\nIt was finished in 1889.\nGustave Eiffel's company built it.\n"
                   "It is 330 metres tall.")
    by_hand_pred = "Gustave Eiffel's company built the tower.\nIt is in Paris and was finished in 1889.\nIt is tall."
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    want = scorer.score(by_hand_ref, by_hand_pred)["rougeLsum"]
    got = score_pairs([MULTI_REF], [MULTI_PRED])[0]
    assert got["rougeLsum"] == pytest.approx({"precision": want.precision, "recall": want.recall, "f1": want.fmeasure})
    # rouge-score on the raw texts has one "sentence" per line: Lsum is then (nearly) L, not sentence-level.
    raw = scorer.score(MULTI_REF, MULTI_PRED)
    assert got["rougeL"]["f1"] == pytest.approx(raw["rougeL"].fmeasure)
    assert got["rougeLsum"]["f1"] > got["rougeL"]["f1"] + 0.1
    assert abs(raw["rougeLsum"].fmeasure - got["rougeLsum"]["f1"]) > 0.05


def test_parallel_scoring_equals_serial():
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat tree. Then it slept! Why? Because".split()
    refs = [" ".join(rng.choice(words, size=rng.integers(5, 40))) for _ in range(300)]
    preds = [" ".join(rng.choice(words, size=rng.integers(0, 40))) for _ in range(300)]
    serial = score_pairs(refs, preds)
    assert score_pairs(refs, preds, workers=2) == serial
    assert score_pairs(refs[:10], preds[:10], workers=4) == serial[:10]  # too few pairs: serial, same numbers


# ---- p-values valid under the null --------------------------------------------------------------------


def test_permutation_p_values_are_valid_under_the_null():
    """No true difference (symmetric per-example deltas): p <= 0.05 in about 5% of experiments, p <= 0.2 in
    about 20%. The old bootstrap p-value (twice the share of bootstrap deltas beyond 0, a distribution centred
    on the observed delta) rejects about twice as often at 0.05 for the same data."""
    rng = np.random.default_rng(7)
    p, old = [], []
    for k in range(300):
        base = rng.uniform(0, 1, size=40)
        tuned = base + rng.normal(0, 0.1, size=40)
        p.append(paired_bootstrap(base, tuned, 500, k, 0.95, permutations=500)["p_value"])
        d = tuned - base
        boot = d[np.random.default_rng(k).integers(0, 40, size=(500, 40))].mean(axis=1)
        old.append(min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0))))
    p, old = np.array(p), np.array(old)
    assert 0.02 <= np.mean(p <= 0.05) <= 0.085
    assert 0.13 <= np.mean(p <= 0.2) <= 0.27
    assert np.mean(old <= 0.05) > np.mean(p <= 0.05)


def test_sign_flip_p_value_exact_on_a_tiny_case():
    # 4 deltas, all positive: of the 16 sign patterns only all-+ and all-- reach |mean| = 1, so p ~ 2/16.
    p = sign_flip_p_value([1.0, 1.0, 1.0, 1.0], permutations=20000, seed=0)
    assert p == pytest.approx(2 / 16, abs=0.01)
    assert sign_flip_p_value([0.0, 0.0, 0.0], permutations=200, seed=0) == 1.0


def test_holm_adjustment_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
