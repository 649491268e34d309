"""The recipe's metrics: JSON lines in <run>/metrics.jsonl, TensorBoard events in <run>/tensorboard, and the
train/eval lines on the console (rank 0 only).

With the run dir on object storage both are written into a local scratch dir (the run's earlier
`metrics.jsonl` downloaded into it first, so a resumed run continues the file) and uploaded to the run dir at
every checkpoint and eval, at most `SYNC_EVERY_S` apart otherwise, and at the end; the scratch dir is then
removed (trainer/storage.py)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.config import TrainConfig
from trainer.log import get_logger

console = get_logger(__name__)  # the train/eval lines on the terminal
SYNC_EVERY_S = 60.0  # object storage: the longest a train line waits for its upload (an upload is one PUT per file)


class MetricLogger:
    """Rank 0 only: JSON lines in <run>/metrics.jsonl and TensorBoard events in <run>/tensorboard."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.remote = cfg.run_dir() if cfg.is_remote_storage else None
        if self.remote:
            root = storage.scratch_dir("metrics")
            storage.download_file(f"{self.remote}/metrics.jsonl", root / "metrics.jsonl")  # a resume continues it
        else:
            root = Path(cfg.run_dir())
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.path = root / "metrics.jsonl"
        self._synced = time.monotonic()
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
        if self.remote and (kind != "train" or time.monotonic() - self._synced > SYNC_EVERY_S):
            self.sync()

    def sync(self) -> bool:
        """Object storage: upload metrics.jsonl and the TensorBoard events written so far. A failed upload is
        logged and retried at the next sync (the local files stay); it does not stop training."""
        if not (self.enabled and self.remote):
            return True
        self._synced = time.monotonic()
        if self.tb is not None:
            self.tb.flush()
        try:
            storage.upload_file(self.path, f"{self.remote}/metrics.jsonl")
            if (self.root / "tensorboard").is_dir():
                storage.upload_dir(self.root / "tensorboard", f"{self.remote}/tensorboard")
        except OSError as e:
            console.warning(f"WARNING: could not upload metrics to {self.remote}: {e} (retried at the next sync)")
            return False
        return True

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()
            if self.remote:
                if self.sync():
                    shutil.rmtree(self.root, ignore_errors=True)
                else:  # kept, not lost: the message says where
                    console.warning(f"WARNING: the run's metrics stay in {self.root} (upload to {self.remote} failed)")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
