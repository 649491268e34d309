"""Checkpoint integrity and safe resumes.

- `write_manifest` (rank 0, after every rank has written): `COMPLETE.json` lists every file of the checkpoint
  with its size. It is written last, atomically, so its presence means the save finished.
- `verify` checks a checkpoint against it: missing manifest (killed mid-write), a missing or truncated file.
- `latest_valid` walks a run's checkpoints newest first and returns the first that verifies, with a warning
  for each one skipped.
- `unsafe_changes` compares a new config with the one a checkpoint was written with: a resume continues when only
  `SAFE_KEYS` changed (run length, logging, checkpoint cadence, time limits) and is refused otherwise, naming each
  key; `record_config` keeps the history of the configs a run used (`config_history.jsonl`).
- `check_free_space` / `enospc_message`: a save that cannot fit fails naming the path and the bytes needed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml

from trainer.failures import FatalError
from trainer.log import get_logger

log = get_logger(__name__)

MANIFEST = "COMPLETE.json"

# Keys a resumed run may change: they do not touch the data order, the shapes, the sharding or the optimizer.
SAFE_KEYS = (
    "schedule.max_steps", "schedule.epochs",
    "logging.", "watchdog.",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.max_failures", "checkpoint.export",
    "checkpoint.storage_path",
    "scaling.cpus_per_worker",
)


class CheckpointDamaged(ValueError):
    """A checkpoint failed verification; the message says what is wrong."""


# ---- integrity -----------------------------------------------------------------------------------

def _files(ckpt: Path) -> dict[str, int]:
    return {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_manifest(ckpt: Path, step: int, world_size: int) -> None:
    files = _files(ckpt)
    record = {"step": step, "world_size": world_size, "time": time.time(), "files": files,
              "bytes": sum(files.values())}
    tmp = ckpt / f".{MANIFEST}.tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt / MANIFEST)


def verify(ckpt: Path) -> dict:
    """The manifest of a complete checkpoint; raises CheckpointDamaged naming what is wrong."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise CheckpointDamaged(f"{ckpt}: no {MANIFEST} (the save did not finish: killed mid-write or out of space)")
    try:
        record = json.loads(manifest.read_text())
        files = record["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(f"{manifest}: unreadable ({e})") from e
    for rel, size in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointDamaged(f"{p}: missing (listed in {MANIFEST})")
        actual = p.stat().st_size
        if actual != size:
            raise CheckpointDamaged(f"{p}: {actual} bytes, {size} expected (truncated or overwritten)")
    return record


def checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, oldest first."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_[0-9]*") if p.is_dir())


def latest_valid(candidates: list[Path], warn=None) -> Path | None:
    """The newest checkpoint that verifies; each damaged one newer than it gets a warning."""
    for ckpt in sorted(candidates, reverse=True):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointDamaged as e:
            (warn or log.warning)(f"WARNING: skipping damaged checkpoint: {e}")
    return None


# ---- config changes on resume ---------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def changed_keys(old: dict, new: dict) -> list[tuple[str, object, object]]:
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_KEYS)


def unsafe_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    return [c for c in changed_keys(old, new) if not is_safe(c[0])]


def refuse_message(source: Path, unsafe: list[tuple[str, object, object]], run_name: str) -> str:
    keys = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in unsafe)
    return (f"checkpoint.run_name {run_name!r} resumes from {source}, but the config changed in ways that would "
            f"silently change the data order or break the saved state: {keys}. Rerun with the checkpoint's values, "
            f"or start a new run (another checkpoint.run_name). Keys a resume may change: {', '.join(SAFE_KEYS)}")


def check_resume(ckpt_config: Path, new: dict, run_name: str) -> list[tuple[str, object, object]]:
    """Raise FatalError when `new` changes an unsafe key of the config saved at `ckpt_config`; return the (safe)
    changes otherwise."""
    old = yaml.safe_load(ckpt_config.read_text()) or {}
    unsafe = unsafe_changes(old, new)
    if unsafe:
        raise FatalError(refuse_message(ckpt_config, unsafe, run_name))
    return changed_keys(old, new)


def record_config(run_dir: Path, cfg_dict: dict, changes: list | None = None) -> None:
    """Write <run>/config.yaml (the config in use) and append it to <run>/config_history.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "changed": [{"key": k, "old": a, "new": b} for k, a, b in (changes or [])], "config": cfg_dict}
    with open(run_dir / "config_history.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    os.replace(tmp, run_dir / "config.yaml")


# ---- disk space ---------------------------------------------------------------------------------------

def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(target: Path, needed: int) -> None:
    """Fail before writing when the volume holding `target` has less than `needed` bytes free."""
    free = shutil.disk_usage(_existing(target)).free
    if free < needed:
        raise FatalError(enospc_message(target, needed, free))


def enospc_message(target: Path, needed: int | None, free: int | None = None, written: int | None = None) -> str:
    if free is None:
        free = shutil.disk_usage(_existing(target)).free
    if needed:
        need = f"about {needed:,} bytes (the size of the previous checkpoint)"
    elif written:
        need = f"more than the {written:,} bytes written before the volume filled"
    else:
        need = "more space"
    return (f"checkpoint save to {target} failed: no space left on its volume ({free:,} bytes free; a checkpoint "
            f"needs {need}). The previous checkpoint is intact. Free space or grow the volume "
            f"(storage.size in the chart), or lower checkpoint.keep, then rerun to resume.")
