"""Faults on request, for the reliability tests (tests/test_reliability*.py set these in real Ray workers).
Nothing happens unless the variable is set. The names show in the stuck thread's stack the watchdog prints
(tests/test_reliability_ray.py looks for `_test_stall` there)."""

from __future__ import annotations

import os
import time


def _test_stall(phase: str, rank: int) -> None:
    """DOLLY_TEST_STALL="RANK:PHASE": that rank blocks forever when it enters that phase."""
    spec = os.environ.get("DOLLY_TEST_STALL", "")
    if spec and spec == f"{rank}:{phase}":
        while True:
            time.sleep(0.2)


def _test_oom(step: int, rank: int) -> None:
    """DOLLY_TEST_OOM_AT_STEP=N: rank 0 runs out of memory in optimizer step N (as torch reports it)."""
    at = os.environ.get("DOLLY_TEST_OOM_AT_STEP")
    if at and int(at) == step and rank == 0:
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (DOLLY_TEST_OOM_AT_STEP={at})")


def _test_kill(step: int, rank: int) -> None:
    """DOLLY_TEST_KILL_AT_STEP="RANK:STEP:MARKER": that rank's process SIGKILLs itself as it enters optimizer step
    STEP, once: it creates the file MARKER first, and a restarted worker that finds it goes on (a worker that
    dies mid-run, as on a lost node: Ray Train restarts the group from the latest checkpoint)."""
    spec = os.environ.get("DOLLY_TEST_KILL_AT_STEP", "")
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if int(r) == rank and int(s) == step and not os.path.exists(marker):
        import signal

        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
