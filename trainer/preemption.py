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

In a pod the kubelet's SIGTERM goes to the container's PID 1 (KubeRay's `ray start --block`), whose own handler
drains the node for up to 30 s while training goes on, then stops the raylet, which kills the workers before a step
and a save can finish (measured: docs/operations.md, "Preemption"). So the chart's `preStop` hook signals the
training processes first: while the handler is installed each one writes a file named after its pid into
DOLLY_SIGTERM_PID_DIR (the chart sets it on worker pods; the file holds the process's start time so that a reused
pid is never signalled), and the hook SIGTERMs every registered pid and waits for it to exit
(charts/dolly-train/templates/_helpers.tpl, "dolly-train.preStopScript").
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from trainer.log import get_logger

log = get_logger(__name__)

PID_DIR_ENV = "DOLLY_SIGTERM_PID_DIR"


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot): with the pid, names one process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def _register(directory: str) -> Path | None:
    """Announce this process to the preStop hook; returns the file to remove, or None when it cannot be written
    (then a pod deletion ends the run at the last periodic checkpoint, as without the hook)."""
    try:
        pid = os.getpid()
        path = Path(directory) / str(pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{pid}.tmp")
        tmp.write_text(_start_time(pid) + "\n")
        os.replace(tmp, path)  # the hook never reads a half-written file
        return path
    except OSError as e:
        log.warning(f"warning: cannot register for the preStop hook in {directory} ({e}); a pod deletion will not "
                    "save a checkpoint first")
        return None


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
        self._install()
        if self._restore is not None and os.environ.get(PID_DIR_ENV):
            registered, restore = _register(os.environ[PID_DIR_ENV]), self._restore

            def unregister():
                restore()
                if registered is not None:
                    registered.unlink(missing_ok=True)

            self._restore = unregister
        return self

    def _install(self) -> None:
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
            return
        try:
            import ray._private.worker as ray_worker

            original = ray_worker.raise_sys_exit_with_custom_error_message
        except (ImportError, AttributeError):
            return

        def divert(*args, **kwargs):
            if self.requested.is_set():
                return original(*args, **kwargs)  # a second SIGTERM: exit as Ray would
            self.requested.set()
            self._note()

        ray_worker.raise_sys_exit_with_custom_error_message = divert
        self._restore = lambda: setattr(ray_worker, "raise_sys_exit_with_custom_error_message", original)

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
