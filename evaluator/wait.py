"""`dolly-eval wait-export`: block until a training run's Hugging Face export is complete, or time out.

The eval Job (manifests/eval-job*.yaml) runs it as its first init container, so the Job can be created together
with the RayJob (same Argo CD sync wave) and the sync ends once both are applied: the ordering lives on the
volume, not in a sync that stays open while the model trains.

What "complete" means comes from the trainer's writers (docs/CONTRACTS.md):
- the export (`trainer/export.py`, `save_hf_folder`) is built in a temp folder and renamed into place
  (`trainer/atomic.py`), so `<export>/config.json` with the weights beside it exists only once the whole folder
  does;
- a checkpoint is complete when its `COMPLETE.json` is there (`trainer/checkpointing.py`), and the final one is
  written before the export. An export older than the run's newest complete checkpoint is therefore an earlier
  attempt's (a run resumed after a Git change, or retried): it is not this run's result, so the wait goes on.

A LoRA run (issue 25) scored as base + adapter (`--adapter`, the eval Job's ADAPTER_DIR) waits for the adapter
folder instead: its MODEL_DIR is then the base model, which never changes. `trainer/lora.py` writes the adapter
folder (`<export>-adapter`, adapter_config.json + adapter_model.safetensors) atomically, the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from trainer.checkpointing import MANIFEST, checkpoints

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", ("adapter_model.safetensors",)


def _age(seconds: float) -> str:
    h, m = divmod(int(seconds) // 60, 60)
    return f"{h} h {m} min" if h else f"{m} min {int(seconds) % 60} s"


def export_state(model_dir: Path, run_dir: Path | None = None, adapter: bool = False) -> tuple[bool, str]:
    """(ready, why): whether model_dir is a complete export (adapter: a complete PEFT adapter folder) of the run's
    latest training, and what is missing."""
    name, weights = (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if adapter else ("config.json", WEIGHTS)
    config = model_dir / name
    if model_dir.exists() and not model_dir.is_dir():
        what = "ADAPTER_DIR must be the run's export-adapter/" if adapter else "MODEL_DIR must be the run's export/"
        raise NotADirectoryError(f"{model_dir}: not a folder ({what} folder)")
    if not config.is_file():
        return False, f"{config} not there yet"
    if not any((model_dir / w).is_file() for w in weights):
        return False, f"{model_dir} has {name} but no {' or '.join(weights)} (not a finished export)"
    if run_dir is not None:
        done = [c for c in checkpoints(run_dir) if (c / MANIFEST).is_file()]
        if done and (done[-1] / MANIFEST).stat().st_mtime > config.stat().st_mtime:
            return False, (f"{model_dir} is older than the run's newest checkpoint {done[-1].name} "
                           "(an earlier attempt's export); waiting for this run's")
    return True, f"{model_dir} is complete"


def wait_for_export(model_dir: str | Path, run_dir: str | Path | None = None, timeout_s: float = 259200,
                    interval_s: float = 60, log_every_s: float = 900, echo: Callable[[str], None] = print,
                    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                    adapter: bool = False) -> bool:
    """Poll until the export (adapter: the PEFT adapter folder in model_dir) is complete (True) or timeout_s
    passed (False). Says what it waits for at the start and then every log_every_s."""
    model_dir, run_dir = Path(model_dir), (Path(run_dir) if run_dir else None)
    start = last_log = clock()
    ready, why = export_state(model_dir, run_dir, adapter)
    if not ready:
        echo(f"waiting up to {_age(timeout_s)} for the export: {why}")
    while not ready:
        now = clock()
        if now - start >= timeout_s:
            echo(f"timed out after {_age(now - start)}: {why}. The training has not exported a model: check the "
                 f"RayJob (`dolly-train status`; a failed run never exports), that train.checkpoint.export is true, "
                 + ("and that ADAPTER_DIR names <storage_path>/<run_name>/export-adapter (train.lora on)" if adapter
                    else "and that MODEL_DIR names <storage_path>/<run_name>/export"))
            return False
        if now - last_log >= log_every_s:
            echo(f"still waiting ({_age(now - start)} so far): {why}")
            last_log = now
        sleep(min(interval_s, max(0.0, timeout_s - (now - start))))
        ready, why = export_state(model_dir, run_dir, adapter)
    echo(f"export ready after {_age(clock() - start)}: {why}")
    return True


def add_parser(sub) -> None:
    p = sub.add_parser("wait-export", help="wait until a run's Hugging Face export is complete",
                       description="Wait until MODEL_DIR holds a complete export (config.json and the weights, "
                                   "written atomically by the trainer) that is newer than the run's newest complete "
                                   "checkpoint. Exits 0 when it is, 124 on --timeout.")
    p.add_argument("--model", required=True, help="the export folder (<storage_path>/<run_name>/export)")
    p.add_argument("--adapter", default="",
                   help="a PEFT adapter folder (<storage_path>/<run_name>/export-adapter): wait for it instead of "
                        "--model (base + adapter scoring, where --model is the unchanging base); empty = none")
    p.add_argument("--run-dir", default=None,
                   help="the run dir (<storage_path>/<run_name>): an export older than its newest checkpoint waits")
    p.add_argument("--timeout", type=float, default=259200,
                   help="seconds to wait (default 72 h, the chart's rayJob.activeDeadlineSeconds)")
    p.add_argument("--interval", type=float, default=60, help="seconds between checks")
    p.set_defaults(func=run)


def run(args) -> int:
    say = lambda m: print(f"dolly-eval wait-export: {m}", flush=True)  # noqa: E731
    try:
        target = args.adapter or args.model
        return 0 if wait_for_export(target, args.run_dir, args.timeout, args.interval, echo=say,
                                    adapter=bool(args.adapter)) else 124
    except NotADirectoryError as e:
        say(f"error: {e}")
        return 2
