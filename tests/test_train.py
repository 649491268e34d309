"""The trainer for real: Ray Train TorchTrainer + DeepSpeed ZeRO on a local Ray cluster with CPU workers.

Each run is a `dolly-train train` subprocess, as a user would run it, joining the session's local Ray cluster
(conftest.py's `ray_cluster`, through RAY_ADDRESS as on KubeRay) instead of starting one of its own; the demo
test runs the in-process start."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_runs import dolly_train, metrics

pytestmark = pytest.mark.slow

BASE = [
    "data.max_length=512",
    "schedule.warmup_steps=0",
    "schedule.decay=constant",  # lets a run be extended with max_steps without changing its LR history
    "batch.micro_batch_size=2",
    "logging.every_steps=3",
    "logging.eval_every_steps=6",
    "logging.eval_max_batches=2",
    "checkpoint.every_steps=6",
]


def train(tmp: Path, model: Path, data: Path, run: str, *extra: str, env: dict | None = None,
          timeout: int = 600):
    return dolly_train("cpu-tiny", tmp, model, data, run, *BASE, *extra, env=env, timeout=timeout)


def probe_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory, tiny_model_dir, synthetic_data_dir, ray_cluster):
    """ZeRO-3 on 2 workers: 12 steps straight; and 6 steps, then the same run name extended to 12."""
    tmp = tmp_path_factory.mktemp("runs")
    z3 = ["deepspeed.stage=3", "schedule.max_steps=12"]
    train(tmp, tiny_model_dir, synthetic_data_dir, "straight", *z3, env=ray_cluster)
    train(tmp, tiny_model_dir, synthetic_data_dir, "resumed", "deepspeed.stage=3", "schedule.max_steps=6",
          env=ray_cluster)
    second = train(tmp, tiny_model_dir, synthetic_data_dir, "resumed", *z3, env=ray_cluster)
    return tmp, second


def test_resume_continues_with_same_data_and_loss(zero3_runs):
    tmp, second = zero3_runs
    assert "resumed from" in second.stdout + second.stderr
    straight, resumed = metrics(tmp / "straight"), metrics(tmp / "resumed")
    assert [m["step"] for m in straight] == [3, 6, 9, 12]
    # the resumed run logged steps 3, 6 in its first leg and 9, 12 after resuming at 6
    assert [m["step"] for m in resumed] == [3, 6, 9, 12]
    assert [m["data_fingerprint"] for m in straight] == [m["data_fingerprint"] for m in resumed]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-3), (a, b)
    assert straight[-1]["loss"] < straight[0]["loss"]


def test_zero3_export_equals_offline_consolidation(zero3_runs, tmp_path, tiny_model_dir):
    """The end-of-run export (shards gathered by the live ZeRO-3 engine) and `dolly-train export` of the
    last checkpoint (shards consolidated offline by DeepSpeed's zero_to_fp32) give the same logits."""
    tmp, _ = zero3_runs
    run = tmp / "straight"
    ckpts = sorted(p for p in run.glob("checkpoint_[0-9]*") if p.is_dir())
    assert [c.name for c in ckpts] == ["checkpoint_00000006", "checkpoint_00000012"]  # keep=2
    # both ranks wrote their ZeRO-3 shards into the checkpoint
    shards = sorted(p.name for p in (ckpts[-1] / "deepspeed" / "state").iterdir())
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards)
    from trainer.cli import main

    assert main(["export", "--checkpoint", str(ckpts[-1]), "--out", str(tmp_path / "offline")]) == 0
    ids = torch.tensor([[1, 3, 2592, 1117, 1040, 6333, 1070, 5611, 4, 1183]])
    live, offline = probe_logits(run / "export", ids), probe_logits(tmp_path / "offline", ids)
    torch.testing.assert_close(live, offline, rtol=1e-5, atol=1e-5)
    base = probe_logits(tiny_model_dir, ids)
    assert (base - live).abs().max() > 1e-2  # training moved the weights: the check above compares trained models
    # the export is a complete HF folder vLLM and transformers can load
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (run / "export" / f).is_file(), f


def test_worker_killed_midrun_recovers(tmp_path, tiny_model_dir, synthetic_data_dir, ray_cluster):
    """SIGKILL rank 1's process after the step-6 checkpoint: Ray Train restarts the worker group from it
    and the run finishes, repeating at most one checkpoint interval."""
    pid_dir = tmp_path / "pids"
    run_dir = tmp_path / "killed"
    killed = {}

    def killer():
        deadline = time.time() + 500
        while time.time() < deadline and not killed:
            done = [m["step"] for m in metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
            # Ray Train registers a reported checkpoint when its controller next polls the workers; kill only
            # once the step-6 checkpoint is in Ray's run snapshot, so the bound below is about resuming.
            snapshot = run_dir / "checkpoint_manager_snapshot.json"
            text = snapshot.read_text() if snapshot.exists() else ""
            registered = max([int(n) for n in re.findall(r"checkpoint_(\d{8})", text)] + [0])
            if done and max(done) >= 9 and registered == max(done) // 6 * 6 and (pid_dir / "rank1.pid").exists():
                pid = int((pid_dir / "rank1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"], killed["after_step"], killed["registered"] = pid, max(done), registered
                (pid_dir / "rank1.pid").unlink()
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    train(tmp_path, tiny_model_dir, synthetic_data_dir, "killed", "schedule.max_steps=18",
          env={**ray_cluster, "DOLLY_PID_DIR": str(pid_dir)})
    t.join(timeout=5)
    assert killed, "the worker was never killed (run finished too fast?)"
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps[-1] == 18
    # after the kill, logging restarts right after the last checkpoint (step 6 or 12)
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == killed["registered"] + 3, (steps, killed)  # resumed from the latest checkpoint
    repeated = steps[restart - 1] - steps[restart] + 3
    assert repeated <= 6, f"repeated {repeated} steps (> one checkpoint interval): {steps}"
    assert (pid_dir / "rank1.pid").exists()  # a new rank-1 worker started
    assert int((pid_dir / "rank1.pid").read_text()) != killed["pid"]
    assert (run_dir / "export" / "model.safetensors").is_file()
