"""`dolly-eval wait-export` (evaluator/wait.py), the eval Job's first init container: run for real (the CLI in a
subprocess) against temp run dirs, with the export written by the trainer's own writer (trainer/export.py's
save_hf_folder through trainer/atomic.py) and checkpoints marked complete the trainer's way (COMPLETE.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluator.wait import export_state
from trainer import checkpointing

REPO = Path(__file__).resolve().parents[1]


def wait_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "evaluator.cli", "wait-export", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def export_from_tiny(tiny_model_dir: Path, out: Path) -> None:
    """The trainer's export path: a state dict saved as a Hugging Face folder, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.export import save_hf_folder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_hf_folder(AutoConfig.from_pretrained(tiny_model_dir), model.state_dict(), out, tokenizer_from=tiny_model_dir)


def complete_checkpoint(run_dir: Path, step: int) -> Path:
    d = run_dir / f"checkpoint_{step:08d}"
    d.mkdir(parents=True)
    checkpointing.write_manifest(d, step, 1)
    assert (d / checkpointing.MANIFEST).is_file()
    return d


def test_no_export_waits_then_times_out_with_a_clear_message(tmp_path):
    run = tmp_path / "runs" / "r1"
    t0 = time.monotonic()
    res = wait_cli("--model", str(run / "export"), "--run-dir", str(run), "--timeout", "2", "--interval", "0.2")
    took = time.monotonic() - t0
    assert res.returncode == 124, res
    assert took >= 2
    out = res.stdout
    assert f"waiting up to 0 min 2 s for the export: {run / 'export' / 'config.json'} not there yet" in out
    assert "timed out after 0 min 2 s" in out and "train.checkpoint.export is true" in out and "dolly-train status" in out


def test_a_half_written_export_is_not_complete(tmp_path, tiny_model_dir):
    run = tmp_path / "r"
    # What atomic_dir leaves while the trainer writes: only the temp folder beside export/.
    tmp = run / ".export.tmp-abc"
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    assert export_state(run / "export", run)[0] is False
    # A folder someone filled by hand, config without weights, is not an export either.
    (run / "export").mkdir()
    (run / "export" / "config.json").write_text("{}")
    ready, why = export_state(run / "export", run)
    assert not ready and "no model.safetensors" in why
    (run / "export.txt").write_text("x")
    assert wait_cli("--model", str(run / "export.txt"), "--timeout", "1").returncode == 2


@pytest.mark.timeout(300)
def test_proceeds_once_the_trainer_exports_while_it_waits(tmp_path, tiny_model_dir):
    run = tmp_path / "runs" / "r2"
    complete_checkpoint(run, 4)
    proc = subprocess.Popen([sys.executable, "-m", "evaluator.cli", "wait-export", "--model", str(run / "export"),
                             "--run-dir", str(run), "--timeout", "240", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    try:
        time.sleep(3)
        assert proc.poll() is None  # still waiting: no export yet
        export_from_tiny(tiny_model_dir, run / "export")  # the final checkpoint (step 4) came first, as in training
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, (out, err)
    assert "waiting up to 4 min 0 s for the export" in out and "export ready after" in out
    assert json.loads((run / "export" / "config.json").read_text())["model_type"] == "mistral"


def test_an_earlier_attempts_export_waits_for_this_runs(tmp_path, tiny_model_dir):
    """A resumed run: the old export is there, but a checkpoint completed after it, so it is not this run's."""
    run = tmp_path / "runs" / "r3"
    export_from_tiny(tiny_model_dir, run / "export")
    assert export_state(run / "export", run) == (True, f"{run / 'export'} is complete")
    time.sleep(0.05)
    ckpt = complete_checkpoint(run, 8)
    mtime = (run / "export" / "config.json").stat().st_mtime
    os.utime(ckpt / checkpointing.MANIFEST, (mtime + 10, mtime + 10))
    res = wait_cli("--model", str(run / "export"), "--run-dir", str(run), "--timeout", "1", "--interval", "0.2")
    assert res.returncode == 124 and "older than the run's newest checkpoint checkpoint_00000008" in res.stdout
    # The new export replaces it atomically: ready again.
    export_from_tiny(tiny_model_dir, run / "export")
    os.utime(run / "export" / "config.json", (mtime + 20, mtime + 20))
    res = wait_cli("--model", str(run / "export"), "--run-dir", str(run), "--timeout", "5")
    assert res.returncode == 0 and "export ready after 0 min 0 s" in res.stdout
    # Without --run-dir only completeness counts.
    assert export_state(run / "export")[0]


def test_waiting_is_bounded_by_the_timeout_without_sleeping_past_it():
    from evaluator.wait import wait_for_export

    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    msgs: list[str] = []
    assert wait_for_export("/nonexistent/export", timeout_s=150, interval_s=60, log_every_s=100,
                           echo=msgs.append, clock=lambda: now[0], sleep=sleep) is False
    assert slept == [60, 60, 30] and now[0] == 150
    assert msgs[0].startswith("waiting up to 2 min 30 s") and msgs[1].startswith("still waiting (2 min 0 s so far)")
    assert msgs[-1].startswith("timed out after 2 min 30 s")


def test_base_plus_adapter_waits_for_the_adapter_not_the_base(tmp_path, tiny_model_dir):
    """The eval Job scoring a LoRA run as base + adapter (MODEL_DIR = the base, ADAPTER_DIR = <run>/export-adapter):
    the base is complete from the start, so the wait is on the adapter folder, written by the trainer's own LoRA
    export (trainer/lora.py, atomically), and an adapter older than the newest checkpoint is an earlier attempt's."""
    import torch

    from trainer import config as C
    from trainer import lora

    run = tmp_path / "runs" / "lora"
    adapter_dir = run / "export-adapter"
    args = ("--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--run-dir", str(run))
    res = wait_cli(*args, "--timeout", "1", "--interval", "0.2")
    assert res.returncode == 124, res
    assert f"{adapter_dir / 'adapter_config.json'} not there yet" in res.stdout and "ADAPTER_DIR names" in res.stdout
    # An empty --adapter (the ConfigMap's default) is none: the model folder is what counts, and the base is there.
    assert wait_cli("--model", str(tiny_model_dir), "--adapter", "", "--timeout", "1").returncode == 0

    cfg = C.load("cpu-tiny-lora", [f"model.path={tiny_model_dir}"])
    base = lora.load_base(cfg, str(tiny_model_dir), torch.float32, "cpu")
    _, peft_model = lora.wrap(base, cfg)
    state = {k: torch.randn_like(v) * 0.01 for k, v in lora.adapter_state(peft_model.base_model.model.state_dict()).items()}
    complete_checkpoint(run, 8)  # the final checkpoint comes before the export, as in training
    time.sleep(0.05)
    adapter_out, merged = lora.export_adapter_and_merged(cfg, state, run / "export", tokenizer_from=tiny_model_dir)
    assert adapter_out == adapter_dir and merged == run / "export"
    res = wait_cli(*args, "--timeout", "5")
    assert res.returncode == 0 and f"{adapter_dir} is complete" in res.stdout, res
    # A later checkpoint (a resumed run) makes that adapter an earlier attempt's.
    mtime = (adapter_dir / "adapter_config.json").stat().st_mtime
    ckpt = complete_checkpoint(run, 12)
    os.utime(ckpt / checkpointing.MANIFEST, (mtime + 10, mtime + 10))
    ready, why = export_state(adapter_dir, run, adapter=True)
    assert not ready and "older than the run's newest checkpoint checkpoint_00000012" in why
    # A merged-export folder is not an adapter folder.
    ready, why = export_state(run / "export", adapter=True)
    assert not ready and "adapter_config.json not there yet" in why
