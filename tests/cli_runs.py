"""`dolly-train train` as a user runs it, for the tests that train through Ray (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def dolly_train(preset: str, tmp: Path, model: Path, data: Path, run: str, *overrides: str, env: dict | None = None,
                timeout: int = 600) -> subprocess.CompletedProcess:
    """One `dolly-train train --config PRESET` subprocess writing TMP/RUN; fails the test with its output's tail."""
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", preset, f"model.path={model}",
           f"data.path={data}", f"checkpoint.storage_path={tmp}", f"checkpoint.run_name={run}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    """The run's metrics.jsonl records of one kind."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]
