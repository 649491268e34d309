"""`dolly-eval compare` on run folders written in the documented format (fast; the slow test in
test_eval_run.py compares a real vLLM run with itself)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
import pytest

from evaluator.cli import main
from evaluator.config import SamplingConfig
from evaluator.report import write_json, write_jsonl
from evaluator.score import ROUGE_TYPES, SENTENCE_SPLITTER, score_pairs

CATEGORIES = ("open_qa", "closed_qa", "summarization")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def references(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(n)]


def degrade(refs: list[str], keep: float, seed: int) -> list[str]:
    """Predictions that keep each reference word with probability `keep` (else a wrong word)."""
    rng = np.random.default_rng(seed)
    return [" ".join(w if rng.uniform() < keep else "wrong" for w in r.split()) for r in refs]


def write_run(path: Path, refs: list[str], preds: list[str], test_sha: str = "a" * 64,
              sampling: dict | None = None, schema_version: int = 2, lsum: str = SENTENCE_SPLITTER,
              prompts_truncated: dict | None = None, categories: tuple = CATEGORIES) -> Path:
    """A run folder as `dolly-eval run` writes it (the fields compare reads), scored by rouge-score."""
    path.mkdir(parents=True)
    rows = [{"id": f"dolly-{i:012x}", "category": categories[i % len(categories)], "seed": None, "reference": r,
             "prediction": p, "scores": s} for i, (r, p, s) in enumerate(zip(refs, preds, score_pairs(refs, preds)))]
    write_jsonl(path / "predictions.jsonl", rows)
    write_json(path / "metrics.json", {
        "schema_version": schema_version, "kind": "dolly-eval/run",
        "model": {"path": str(path / "model"), "weights_sha256": "b" * 64},
        "data": {"test_sha256": test_sha, "limit": None,
                 "prompts_truncated": prompts_truncated or {"count": 0, "max_prompt_tokens": 488, "examples": []}},
        "sampling": sampling or SamplingConfig().effective(),
        "scoring": {"rougeLsum": lsum},
    })
    return path


def test_identical_runs_give_zero_deltas(tmp_path, capsys):
    refs = references(60)
    preds = degrade(refs, 0.6, seed=1)
    base = write_run(tmp_path / "base", refs, preds)
    tuned = write_run(tmp_path / "tuned", refs, preds)
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["schema_version"] == 2 and result["scoring"]["paired"] is True
    for table in [result["overall"], *result["by_category"].values()]:
        for t in ROUGE_TYPES:
            assert table[t]["delta"] == 0.0 and table[t]["ci_low"] == 0.0 and table[t]["ci_high"] == 0.0
            assert table[t]["p_value"] == 1.0 and table[t]["p_holm"] == 1.0
    assert sorted(result["by_category"]) == sorted(CATEGORIES)
    assert result["overall"]["rougeL"]["n"] == 60 and result["by_category"]["open_qa"]["rougeL"]["n"] == 20
    for name in ("compare.md", "compare.html", "compare.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "delta" in out and "overall" in out and "rougeL" in out
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "cmp").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    # Writing again replaces the folder whole, leaving no temp or old folder behind.
    (tmp_path / "cmp" / "stale.txt").write_text("from an earlier compare")
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp")]) == 0
    assert not (tmp_path / "cmp" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "cmp", "tuned"]


def test_better_run_has_positive_delta_with_ci_and_p_value(tmp_path):
    refs = references(90)
    base = write_run(tmp_path / "base", refs, degrade(refs, 0.4, seed=1))
    tuned = write_run(tmp_path / "tuned", refs, degrade(refs, 0.8, seed=2))
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp"), "--bootstrap-resamples", "500"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    r = result["overall"]["rougeL"]
    assert r["tuned"] > r["base"] and r["delta"] == pytest.approx(r["tuned"] - r["base"])
    assert 0 < r["ci_low"] < r["delta"] < r["ci_high"] and r["p_value"] < 0.01
    assert result["scoring"]["resamples"] == 500
    # The means are the plain means of the per-example F1 in the runs' predictions.jsonl.
    rows = [json.loads(line) for line in (base / "predictions.jsonl").read_text().split("\n") if line]
    assert r["base"] == pytest.approx(np.mean([x["scores"]["rougeL"]["f1"] for x in rows]))
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"{r['delta']:+.4f}" in md and "compare.png" in md


@pytest.mark.parametrize("change, needle", [
    ({"test_sha": "c" * 64}, "different test splits"),
    ({"sampling": {**SamplingConfig().effective(), "max_new_tokens": 16}}, "different sampling settings"),
    ({"sampling": SamplingConfig(temperature=0.7).effective()}, "different sampling settings"),
    ({"lsum": "newline-separated only"}, "different ROUGE-Lsum sentence splitting"),
    ({"schema_version": 1}, "schema_version 1, expected 2"),
])
def test_refuses_incomparable_runs(tmp_path, capsys, change, needle):
    refs = references(12)
    base = write_run(tmp_path / "base", refs, refs)
    tuned = write_run(tmp_path / "tuned", refs, refs, **change)
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def cut(max_model_len: int, kept: dict[str, int], recorded: bool = True) -> dict:
    """data.prompts_truncated as `dolly-eval run` writes it (max_new_tokens 24: SamplingConfig's default is
    read from the runs' sampling); `recorded=False`: a run from before max_model_len was stored there."""
    new_tokens = SamplingConfig().effective()["max_new_tokens"]
    rec = {"count": len(kept), "max_prompt_tokens": max_model_len - new_tokens,
           "examples": [{"id": i, "line": 1, "prompt_tokens": 900, "kept_tokens": max_model_len - new_tokens,
                         "context_chars": 3000, "kept_context_chars": k} for i, k in kept.items()]}
    return {**rec, "max_model_len": max_model_len} if recorded else rec


@pytest.mark.parametrize("recorded", [True, False])
def test_refuses_runs_with_different_max_model_len(tmp_path, capsys, recorded):
    # Issue 26, bug 7: the base run fitted its prompts to 512 tokens, the tuned one to 256 (a longer prompt cut
    # shorter): the models saw different prompts, so the delta is not the models' alone.
    refs = references(12)
    base = write_run(tmp_path / "base", refs, refs, prompts_truncated=cut(512, {}, recorded))
    tuned = write_run(tmp_path / "tuned", refs, refs,
                      prompts_truncated=cut(256, {"dolly-000000000001": 420}, recorded))
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "different max_model_len" in err and "max_model_len 512" in err and "to 256" in err, err
    assert str(base) in err and str(tuned) in err
    assert not (tmp_path / "cmp").exists()


def test_refuses_runs_whose_prompts_were_cut_differently(tmp_path, capsys):
    refs = references(12)
    base = write_run(tmp_path / "base", refs, refs, prompts_truncated=cut(512, {"dolly-000000000001": 420}))
    tuned = write_run(tmp_path / "tuned", refs, refs, prompts_truncated=cut(512, {"dolly-000000000001": 380}))
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "cut different prompts" in err and "dolly-000000000001" in err, err
    # The same limit and the same cuts compare fine.
    same = write_run(tmp_path / "same", refs, refs, prompts_truncated=cut(512, {"dolly-000000000001": 420}))
    assert main(["compare", str(base), str(same), "--out", str(tmp_path / "cmp")]) == 0


def test_refuses_missing_or_unfinished_runs(tmp_path, capsys):
    refs = references(6)
    base = write_run(tmp_path / "base", refs, refs)
    assert main(["compare", str(base), str(tmp_path / "nope"), "--out", str(tmp_path / "cmp")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "predictions.jsonl").write_text("")
    assert main(["compare", str(base), str(tmp_path / "half"), "--out", str(tmp_path / "cmp")]) == 2
    assert "metrics.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_report_counts_the_comparisons_and_holm_adjusts_them(tmp_path, capsys):
    refs = references(90)
    base = write_run(tmp_path / "base", refs, degrade(refs, 0.5, seed=1))
    tuned = write_run(tmp_path / "tuned", refs, degrade(refs, 0.7, seed=2))
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp"), "--permutations", "2000"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    sc = result["scoring"]
    # overall + 3 categories, x 4 metrics
    assert sc["comparisons"] == (1 + len(CATEGORIES)) * len(ROUGE_TYPES) == 16
    assert sc["permutations"] == 2000 and sc["correction"] == "holm" and "permutation" in sc["test"]
    cells = [table[t] for table in [result["overall"], *result["by_category"].values()] for t in ROUGE_TYPES]
    for c in cells:
        assert c["p_value"] <= c["p_holm"] <= 1.0
    smallest = min(cells, key=lambda c: c["p_value"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, 16 * smallest["p_value"]))
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "16 comparisons" in md and "uncorrected" in md and "Holm" in md
    assert "16 comparisons" in capsys.readouterr().out


def test_headline_opens_every_output(tmp_path, capsys):
    # open_qa much better, summarization worse, closed_qa unchanged; the oracle is the numbers in compare.json.
    refs = references(240)
    base_preds = degrade(refs, 0.5, seed=1)
    better, worse = degrade(refs, 0.95, seed=2), degrade(refs, 0.1, seed=3)
    tuned_preds = [better[i] if CATEGORIES[i % 3] == "open_qa" else worse[i] if CATEGORIES[i % 3] == "summarization"
                   else base_preds[i] for i in range(len(refs))]
    base = write_run(tmp_path / "base", refs, base_preds)
    tuned = write_run(tmp_path / "tuned", refs, tuned_preds)
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp"), "--permutations", "2000"]) == 0
    out = capsys.readouterr().out.splitlines()
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    r = result["overall"]["rougeL"]
    first = (f"Overall ROUGE-L F1 {r['base']:.4f} (base) -> {r['tuned']:.4f} (tuned): delta {r['delta']:+.4f}, "
             f"95% CI [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]")
    cats = result["by_category"]
    assert cats["open_qa"]["rougeL"]["p_holm"] < 0.05 < cats["closed_qa"]["rougeL"]["p_holm"]
    assert cats["summarization"]["rougeL"]["delta"] < 0 and cats["summarization"]["rougeL"]["p_holm"] < 0.05
    second = (f"Significantly better ROUGE-L (Holm p < 0.05): open_qa ({cats['open_qa']['rougeL']['delta']:+.3f}); "
              f"significantly worse: summarization ({cats['summarization']['rougeL']['delta']:+.3f}).")
    # Terminal: the headline's two sentences first, then the whole table.
    assert out[0].startswith(first) and "(Holm-corrected over 16 tests)" in out[0], out[0]
    assert f"p = {r['p_holm']:.4f}" in out[0] or (r["p_holm"] < 1e-4 and "p < 0.0001" in out[0])
    assert out[1] == second and out[2].split()[:2] == ["group", "metric"]
    assert sum(1 for line in out if line.split()[:1] in (["open_qa"], ["closed_qa"], ["summarization"])) == 12
    # Markdown and HTML: the headline is the first paragraph after the title, before the table.
    md = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    body = [line for line in md if line.strip()]
    assert body[0] == "# dolly-eval compare" and body[1].startswith("**" + first) and body[2] == second
    assert body[3].startswith("| group | metric |")
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert page.index(html.escape(first)) < page.index(html.escape(second)) < page.index("<table>")
    # --brief: the headline and the overall rows only.
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp2"), "--permutations", "2000",
                 "--brief"]) == 0
    brief = capsys.readouterr().out.splitlines()
    assert brief[:2] == out[:2] and [line.split()[0] for line in brief[2:]] == ["group"] + ["overall"] * 4


def test_headline_without_significant_changes(tmp_path, capsys):
    refs = references(30)
    preds = degrade(refs, 0.6, seed=1)
    assert main(["compare", str(write_run(tmp_path / "b", refs, preds)), str(write_run(tmp_path / "t", refs, preds)),
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("p = 1.0000 (Holm-corrected over 16 tests): no significant difference at the 0.05 level.")
    assert out[1] == "No category's ROUGE-L changed significantly (Holm p < 0.05; 3 categories)."
