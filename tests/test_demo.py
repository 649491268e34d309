"""`make demo`'s script, end to end at a smaller scale: tiny model -> synthetic data -> Ray Train + DeepSpeed
ZeRO-2 on 2 CPU workers -> export -> vLLM eval of base and fine-tuned -> ROUGE comparison."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.slow


def test_demo_trains_and_beats_the_base_model(repo, tmp_path):
    # The machine's torch-extensions cache holds the lock a killed DeepSpeed op build leaves: the demo must
    # neither wait on it (it did, forever) nor build anything at run time.
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").write_text("")
    env = {**os.environ, "DEMO_EXAMPLES": "1500", "DEMO_TEST_SIZE": "60", "TORCH_EXTENSIONS_DIR": str(ext),
           "DEMO_TRAIN_ARGS": "schedule.max_steps=90 schedule.warmup_steps=10 logging.eval_every_steps=45"}
    proc = subprocess.run(["bash", str(repo / "scripts" / "demo.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "built successfully" not in proc.stdout + proc.stderr  # no DeepSpeed op was JIT-built
    assert sorted(p.name for p in (ext / "deepspeed_shm_comm").iterdir()) == ["lock"]
    run = tmp_path / "runs" / "tiny-demo"

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert rows[-1]["kind"] in ("eval", "checkpoint")
    assert losses[0] > 8.0  # ~ln(32768) = 10.4 for a random model
    assert losses[-1] < 0.45 * losses[0], losses  # the training loss falls well below its start

    compare = json.loads((run / "eval" / "compare" / "compare.json").read_text())
    rouge_l = compare["overall"]["rougeL"]
    assert rouge_l["base"] < 0.1
    assert rouge_l["tuned"] > rouge_l["base"] + 0.15, rouge_l  # clearly higher
    assert rouge_l["ci_low"] > 0 and rouge_l["p_value"] < 0.01, rouge_l
    assert "rougeL" in proc.stdout and "compare.md" in proc.stdout  # the table and the report path are printed
