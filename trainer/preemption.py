"""SIGTERM (node drain, spot reclaim, pod deletion): finish the current step, save together, exit for a restart.

Kubernetes sends SIGTERM, waits `terminationGracePeriodSeconds`, then SIGKILLs. While the training loop runs,
`StopOnSigterm` turns the first SIGTERM into a flag instead of an exit. After every optimizer step the ranks
agree on the flag (one all-reduce of one number); when any rank has it, every rank saves the checkpoint of the
step just finished and raises `Preempted`. Ray Train restarts the worker group (a retryable failure, counted
in `checkpoint.max_failures`) and the run resumes from that checkpoint: at most the interrupted step is repeated.
A second SIGTERM exits at once, as before.

In a Ray Train worker the training function runs in a thread, and only the main thread may install a signal
handler; Ray's own main-thread handler exits through `ray._private.worker.raise_sys_exit_with_custom_error_message`,
so that name is diverted while the loop runs (Ray 2.60 internals; if they move, SIGTERM exits as before and the
run resumes from the last periodic checkpoint). Without Ray (world size 1) a plain handler is installed.
"""

from __future__ import annotations

import signal
import threading

from trainer.log import get_logger

log = get_logger(__name__)


class Preempted(RuntimeError):
    """The worker got SIGTERM and saved a checkpoint: restart from it (retryable)."""


class StopOnSigterm:
    def __init__(self, rank: int):
        self.rank = rank
        self.requested = threading.Event()
        self._restore = None

    def _note(self) -> None:
        log.error(f"rank {self.rank}: SIGTERM received; finishing the current step, then saving a checkpoint "
                  "and exiting")

    def install(self) -> "StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)

            def handler(signum, frame):
                if self.requested.is_set() and callable(previous):
                    return previous(signum, frame)
                if self.requested.is_set():
                    raise SystemExit(128 + signum)
                self.requested.set()
                self._note()

            signal.signal(signal.SIGTERM, handler)
            self._restore = lambda: signal.signal(signal.SIGTERM, previous)
            return self
        try:
            import ray._private.worker as ray_worker

            original = ray_worker.raise_sys_exit_with_custom_error_message
        except (ImportError, AttributeError):
            return self

        def divert(*args, **kwargs):
            if self.requested.is_set():
                return original(*args, **kwargs)  # a second SIGTERM: exit as Ray would
            self.requested.set()
            self._note()

        ray_worker.raise_sys_exit_with_custom_error_message = divert
        self._restore = lambda: setattr(ray_worker, "raise_sys_exit_with_custom_error_message", original)
        return self

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
