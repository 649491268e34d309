"""Where the recipe runs: a Ray Train V2 worker (`RayContext`), or one process without Ray (`LocalContext`,
used by bench/train_throughput.py and the packing tests). Both give the recipe its rank and world size, the
checkpoint to resume from, a folder to write a checkpoint into, and a way to report metrics."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from trainer import checkpointing
from trainer.config import TrainConfig
from trainer.log import get_logger

log = get_logger(__name__)


class LocalContext:
    """World size 1, no Ray: checkpoints are plain directories under `run_dir`."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def latest_checkpoint(self) -> Path | None:
        return checkpointing.latest_valid(checkpointing.checkpoints(self.run_dir))

    @contextlib.contextmanager
    def checkpoint_dir(self, name: str) -> Iterator[Path]:
        final = self.run_dir / name
        tmp = self.run_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def report(self, metrics: dict, checkpoint: Path | None = None) -> None:
        pass

    def release_checkpoint(self) -> None:
        pass  # read in place: nothing was downloaded


class RayContext:
    """Ray Train V2 worker: rank/world from the train context, checkpoints through `ray.train.report`."""

    def __init__(self, cfg: TrainConfig):
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.run_dir = Path(cfg.run_dir()) if not cfg.is_remote_storage else None
        self._pending: Any = None
        self._download: Path | None = None  # object storage: the local copy of the checkpoint resumed from

    def latest_checkpoint(self):
        if self.run_dir is not None:
            # Shared filesystem: read in place; the newest checkpoint that verifies (a damaged one is skipped with
            # a warning), rank 0's choice for every rank.
            warn = log.warning if self.rank == 0 else (lambda _m: None)
            found = checkpointing.latest_valid(checkpointing.checkpoints(self.run_dir), warn=warn)
            if self.world_size > 1:
                choice = [str(found) if found else None]
                torch.distributed.broadcast_object_list(choice, src=0)
                found = Path(choice[0]) if choice[0] else None
            return found
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return None
        # Object storage: download into a scratch dir of our own (Ray's default is a new /tmp folder per call
        # that nobody removes: a 7B ZeRO-3 checkpoint is ~100 GB per restart); `release_checkpoint` removes it.
        self.release_checkpoint()
        self._download = Path(tempfile.mkdtemp(prefix="dolly-resume-"))
        path = Path(ckpt.to_directory(str(self._download)))
        checkpointing.verify(path)
        return path

    def release_checkpoint(self) -> None:
        """Remove the local copy of a checkpoint downloaded from object storage (after the resume, or when the
        worker fails)."""
        if self._download is not None:
            shutil.rmtree(self._download, ignore_errors=True)
            self._download = None

    @contextlib.contextmanager
    def checkpoint_dir(self, name: str) -> Iterator[Path]:
        # Shared filesystem: every rank writes its shards straight into the run dir (no second copy of
        # ~100 GB of optimizer state for a 7B model); object storage: write locally, Ray uploads.
        if self.run_dir is not None:
            path = self.run_dir / name
            path.mkdir(parents=True, exist_ok=True)
            yield path
            self._pending = (path, "NO_UPLOAD", name)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}-"))
            yield tmp
            self._pending = (tmp, "SYNC", name)

    def report(self, metrics: dict, checkpoint: Path | None = None) -> None:
        from ray.train import Checkpoint
        from ray.train.v2.api.report_config import CheckpointUploadMode

        if checkpoint is None:
            self._train.report(metrics)
            return
        path, mode, name = self._pending
        self._train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(path)),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode[mode],
        )
        if mode == "SYNC":
            shutil.rmtree(path, ignore_errors=True)
