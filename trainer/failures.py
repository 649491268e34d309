"""Which failures Ray Train may retry, and which stop the run at once.

Ray Train V2 restarts the worker group after any worker error, up to `checkpoint.max_failures` times
(`DefaultFailurePolicy` treats every `WorkerGroupError` as retryable). A restart fixes a lost node or a killed
worker; it does not fix an out-of-memory error at the same step with the same shapes, a config error, a missing
file, an import error or a watchdog timeout: each repeats, `max_failures` times, burning GPU hours.

So the worker turns those into `FatalError` (`classify`), and `StopOnFatalError`, a Ray Train `UserCallback`
running in the controller, raises as soon as a worker reports one. Ray Train wraps an exception raised in a
callback into a `ControllerError` that its failure policy does not retry: the run ends with the product's
message. Worker deaths (`RayActorError`, a node lost, a process killed) never pass through `classify` and stay
retryable.

Decided per case, by whether a restart would meet the same condition:
- a missing file (`FileNotFoundError`) is retried when the file is there by the time the error is classified
  (waited for up to `MISSING_FILE_GRACE_S`: a network volume or an object-store mount that shows a new file late,
  a file another job is still moving into place); still missing, it is fatal (a wrong model or data path, a
  model dir absent at start), and a missing file the error does not name is fatal too;
- a watchdog timeout (`trainer.watchdog.PhaseTimeout`) is retried when the stuck thread waits in a collective (one
  rank stalled, a network blip: a restart forms a new process group) and fatal otherwise (a stale build lock, a
  hung read, a stuck phase of our own code); a collective that stalls on every attempt is retried
  `checkpoint.max_failures` times at most;
- out of memory, a full disk, a config error and an import error are always fatal.
"""

from __future__ import annotations

import errno
import os
import time


OOM_HINT = (
    "Out of GPU memory. Knobs, cheapest first: model.activation_checkpointing=true, a smaller "
    "batch.micro_batch_size (raise batch.gradient_accumulation_steps to keep the global batch), "
    "deepspeed.stage=3, deepspeed.offload_optimizer=true, deepspeed.offload_params=true, more workers."
)


# How long `classify` waits for a missing file to show up before calling the error fatal (the environment variable
# is for tests and for volumes known to be slower).
MISSING_FILE_GRACE_S = float(os.environ.get("DOLLY_MISSING_FILE_GRACE_S", "30"))


class FatalError(RuntimeError):
    """A failure that would repeat on restart: the run stops, Ray Train does not retry it."""

    dolly_fatal = True


class RunAborted(RuntimeError):
    """Raised in the Ray Train controller: a worker reported a `FatalError`."""


def appears(path: str, grace_s: float) -> bool:
    """Whether `path` exists now or within `grace_s` seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        if os.path.exists(path):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def classify(exc: BaseException, missing_file_grace_s: float | None = None) -> FatalError | None:
    """A `FatalError` for an exception a restart would repeat, else None (Ray Train may retry)."""
    if isinstance(exc, FatalError):
        return exc if is_fatal(exc) else None
    from trainer.config import ConfigError

    try:
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError)
    except ImportError:  # pragma: no cover - torch is always there in a worker
        oom = False
    if oom:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return FatalError(f"{OOM_HINT} (not retried: the same step with the same shapes would run out again; "
                          f"{first})")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return FatalError(f"no space left on device: {exc}")
    if isinstance(exc, ConfigError):
        return FatalError(f"config error (not retried): {exc}")
    if isinstance(exc, FileNotFoundError):
        grace = MISSING_FILE_GRACE_S if missing_file_grace_s is None else missing_file_grace_s
        if exc.filename and appears(os.fsdecode(exc.filename), grace):
            return None  # there now: a restart finds it
        return FatalError(f"missing file (not retried: still missing {grace:.0f} s later): {exc}")
    if isinstance(exc, ImportError):
        return FatalError(f"import error (not retried; check the image's packages): {exc}")
    return None


def is_fatal(exc: BaseException) -> bool:
    return bool(getattr(exc, "dolly_fatal", False))


def _make_callback_class():
    from ray.train import UserCallback

    class StopOnFatalError(UserCallback):
        """Controller side: end the run at the first `FatalError` a worker reports (no worker-group restart)."""

        def after_exception(self, run_context, worker_exceptions):
            fatal = {rank: e for rank, e in sorted(worker_exceptions.items()) if is_fatal(e)}
            if fatal:
                raise RunAborted("; ".join(f"rank {rank}: {e}" for rank, e in fatal.items()))

    return StopOnFatalError


def stop_on_fatal_callback():
    """A `StopOnFatalError` instance for `RunConfig(callbacks=[...])` (imports Ray only when called)."""
    return _make_callback_class()()


def root_cause(error: BaseException) -> str:
    """The product's message out of what `TorchTrainer.fit()` raised (ControllerError / WorkerGroupError)."""
    inner = getattr(error, "controller_failure", None)
    if isinstance(inner, RunAborted):
        return str(inner)
    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {e}" for rank, e in sorted(failures.items()))
    if inner is not None:
        return f"{type(inner).__name__}: {inner}"
    return str(error)
