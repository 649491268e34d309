"""A time limit on every worker phase: a stuck run fails loudly instead of waiting forever.

    wd = Watchdog(rank=0)
    with wd.phase("deepspeed.initialize", limit_s=900):
        ...

One daemon thread per worker watches the phase the training thread is in. When a phase passes its limit it
builds a `PhaseTimeout` that names the phase, the rank, the elapsed time and the stuck thread's Python stack
(and any torch-extensions build lock the stack is waiting on), dumps every thread's stack to stderr
(`faulthandler`), and fails the worker:

- in a Ray Train worker, by handing the error to Ray Train's training-thread runner (the same queue Ray uses to
  fail a worker from its checkpoint-upload thread), so the controller sees a worker error at its next poll
  (a few seconds) even though the training thread is still blocked, and kills the workers; it stops the run
  (a fatal `PhaseTimeout`, see trainer/failures.py) unless the stuck thread waits in a collective
  (`in_collective`): a stalled peer or network blip, which Ray Train retries from the latest checkpoint;
- without Ray (world size 1), by raising the error asynchronously in the training thread;
- and, if the process is somehow still stuck `exit_after_s` later, by exiting the process (code 70).

Limits default to generous values scaled by model size (`default_limits`); `watchdog.*` in the config sets them.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from trainer.failures import FatalError
from trainer.log import get_logger

log = get_logger(__name__)


class PhaseTimeout(FatalError):
    """A worker phase ran past its time limit. Fatal unless `retryable` (the stuck thread waits in a collective)."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.dolly_fatal = not retryable


# Frames of a thread blocked in a collective: torch.distributed's calls and DeepSpeed's comm wrappers around them.
COLLECTIVE_FRAMES = ("torch/distributed/distributed_c10d.py", "torch/distributed/c10d_logger.py", "deepspeed/comm/")


def in_collective(stack: str) -> bool:
    """Whether the innermost frames of `stack` (traceback.format_stack text) are a torch.distributed collective."""
    files = [line.split('"')[1] for line in stack.splitlines() if line.strip().startswith('File "')]
    return any(marker in f for f in files[-4:] for marker in COLLECTIVE_FRAMES)


def weights_gb(model_path: str) -> float:
    """Size of the model's weight files in GB (0 when the folder is not local)."""
    p = Path(model_path)
    if not p.is_dir():
        return 0.0
    files = [f for pat in ("*.safetensors", "*.bin", "*.pt") for f in p.glob(pat)]
    return sum(f.stat().st_size for f in files) / 1e9


def default_limits(cfg, n_params: int | None = None) -> tuple[int, int]:
    """(setup limit, step limit) in seconds: the config's values, else 300 + 60/GB and 120 + 20/GB of weights
    (a 7B bf16 model, 14.5 GB: ~20 min per setup phase, ~7 min per step, the first one with its warm-up). The size
    is the weight files on disk, or 2 bytes per parameter once the model is built (`n_params`)."""
    gb = max(weights_gb(cfg.model.path), 2 * (n_params or 0) / 1e9)
    setup = cfg.watchdog.setup_s or int(300 + 60 * gb)
    step = cfg.watchdog.step_s or int(120 + 20 * gb)
    return setup, step


def extension_locks() -> list[Path]:
    """Build locks in the torch extensions cache (a killed JIT build leaves one; every later build waits on it)."""
    roots = [os.environ.get("TORCH_EXTENSIONS_DIR"), str(Path.home() / ".cache" / "torch_extensions")]
    found: list[Path] = []
    for root in filter(None, roots):
        r = Path(root)
        if r.is_dir():
            found += [p for pat in ("*/lock", "*/*/lock") for p in r.glob(pat)]
    return sorted(set(found))


def _lock_hint(stack: str) -> str:
    locks = extension_locks()
    if not locks and "file_baton" not in stack:
        return ""
    now = time.time()
    listed = ", ".join(f"{p} (age {now - p.stat().st_mtime:.0f} s)" for p in locks if p.exists()) or "none found"
    return (f" It is waiting on a torch-extensions build lock: {listed}. A build killed part-way leaves that "
            f"file and every later build waits on it forever; if no other build is running, delete it "
            f"(rm <path>) and rerun.")


class Watchdog:
    def __init__(self, rank: int, exit_after_s: float = 120.0, poll_s: float = 0.5):
        self.rank = rank
        self.exit_after_s = exit_after_s
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._phase: tuple[str, float, float, threading.Thread] | None = None  # name, start, limit, thread
        self._fired: PhaseTimeout | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dolly-watchdog-rank{rank}", daemon=True)
        self._thread.start()

    @contextmanager
    def phase(self, name: str, limit_s: float) -> Iterator[None]:
        with self._lock:
            outer = self._phase
            self._phase = (name, time.monotonic(), float(limit_s), threading.current_thread())
        try:
            yield
        finally:
            with self._lock:
                self._phase = outer

    def close(self) -> None:
        self._stop.set()

    # ---- the watching thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                current = self._phase
            if current is None:
                continue
            name, start, limit, thread = current
            elapsed = time.monotonic() - start
            if elapsed <= limit:
                continue
            err = self._timeout_error(name, elapsed, limit, thread)
            self._fired = err
            log.error(str(err))
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self._fail(err, thread)
            # Still here after exit_after_s: the controller never stopped us (or there is none). Exit.
            if not self._stop.wait(self.exit_after_s):
                log.error(f"rank {self.rank}: still stuck {self.exit_after_s:.0f} s after the watchdog fired; "
                          "exiting the process")
                os._exit(70)
            return

    def _timeout_error(self, name: str, elapsed: float, limit: float, thread: threading.Thread) -> PhaseTimeout:
        frame = sys._current_frames().get(thread.ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no Python frame)\n"
        hint = _lock_hint(stack)
        retryable = not hint and in_collective(stack)
        verdict = (" It waits in a collective (a stalled peer or network): Ray Train restarts the workers from the "
                   "latest checkpoint (checkpoint.max_failures)." if retryable else " Not retried.")
        return PhaseTimeout(
            f"watchdog: rank {self.rank} spent {elapsed:.0f} s in phase '{name}' (limit {limit:.0f} s; "
            f"watchdog.setup_s / watchdog.step_s set the limits).{hint}{verdict}\n"
            f"Stack of the stuck thread ({thread.name}):\n{stack}", retryable=retryable)

    def _fail(self, err: PhaseTimeout, thread: threading.Thread) -> None:
        if _hand_to_ray_train(err):
            return
        # No Ray: raise in the training thread at its next Python bytecode (a C call blocks it until it returns).
        message, retryable = str(err), not err.dolly_fatal
        exc_type = type("PhaseTimeout", (PhaseTimeout,),
                        {"__init__": lambda self, *a: PhaseTimeout.__init__(self, message, retryable)})
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


def _hand_to_ray_train(err: BaseException) -> bool:
    """Report `err` as this Ray Train worker's error now, though the training thread is still running.
    Uses the queue Ray Train's own background threads fail a worker through (Ray 2.60 internals)."""
    try:
        from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
        from ray.train.v2._internal.execution.context import get_train_context

        runner = get_train_context().execution_context.training_thread_runner
        runner.get_exception_queue().put(UserExceptionWithTraceback(err, traceback_str=str(err)))
        return True
    except Exception:  # not in a Ray Train worker, or Ray's internals moved: fall back
        return False
