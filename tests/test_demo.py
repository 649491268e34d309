"""`make demo`'s script, end to end at a smaller scale: tiny model -> synthetic data -> Ray Train + DeepSpeed
ZeRO-2 on 2 CPU workers -> export -> vLLM eval of base and fine-tuned -> ROUGE comparison."""

from __future__ import annotations

import json
import os
import re
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

    # What a person sees (issue 29): about 60 lines, the answer in one sentence, none of the libraries' internals.
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 70, "\n".join(lines)
    headline = [line for line in lines if line.startswith("Overall ROUGE-L F1 ")]
    assert headline == [f"Overall ROUGE-L F1 {rouge_l['base']:.4f} (base) -> {rouge_l['tuned']:.4f} (tuned): delta "
                        f"{rouge_l['delta']:+.4f}, 95% CI [{rouge_l['ci_low']:+.4f}, {rouge_l['ci_high']:+.4f}], "
                        f"p = {rouge_l['p_holm']:.4f} (Holm-corrected over 36 tests): fine-tuning helped."], lines
    after = lines[lines.index(headline[0]) + 1:]
    assert after[0].startswith(("Significantly better ROUGE-L", "No category's ROUGE-L")), after
    assert [line.split()[:2] for line in after[2:6]] == [["overall", t] for t in ("rouge1", "rouge2", "rougeL",
                                                                                 "rougeLsum")], after
    assert not [line for line in after if line.split()[:1] == ["open_qa"]]  # per category: in the files only
    # Raw lines of vLLM (its log format, engine arguments, Triton probes) or Ray (actor prefixes, Ray Train's
    # reports) anywhere but in a line of the product's own (a `[dolly-...]` line may quote a vLLM warning).
    internals = re.compile(r"pid=\d+\)|\b(INFO|DEBUG)\b|non-default args|Reporting training result|"
                           r"Failed to query Ray|TrainingReport\(|Triton|RayTrainWorker|EngineCore")
    ours = ("[dolly-train] ", "[dolly-eval] ")
    raw = [line for line in lines if internals.search(line) and not line.startswith(ours)]
    assert not raw, raw
    print("\n".join(lines))  # shown by `pytest -rP`: what a person sees
    for phase in ("base", "tuned"):
        log = run / "eval" / phase / "eval.log"
        assert "non-default args" in log.read_text() or "EngineCore" in log.read_text()  # vLLM's lines went here
        assert f"(full log: {log.resolve()}" in proc.stderr  # the "wrote" line names it
