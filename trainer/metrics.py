"""The recipe's metrics: JSON lines in <run>/metrics.jsonl, TensorBoard events in <run>/tensorboard, and the
train/eval lines on the console (rank 0 only)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.log import get_logger

console = get_logger(__name__)  # the train/eval lines on the terminal


class MetricLogger:
    """Rank 0 only: JSON lines in <run>/metrics.jsonl and TensorBoard events in <run>/tensorboard."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        root = Path(cfg.run_dir()) if not cfg.is_remote_storage else Path(tempfile.gettempdir()) / "dolly-train" / cfg.checkpoint.run_name
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "metrics.jsonl"
        self.fh = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(root / "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, kind: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "time": time.time(), **metrics}
        self.fh.write(json.dumps(record) + "\n")
        if kind == "train":
            console.info(" ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
        elif kind == "eval":
            console.info(f"step={metrics['step']} val_loss={metrics['val_loss']:.4f}")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, metrics["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
