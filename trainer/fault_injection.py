"""Faults on request, for the reliability tests (tests/test_reliability*.py set these in real Ray workers).
Nothing happens unless the variable is set. The names show in the stuck thread's stack the watchdog prints
(tests/test_reliability_ray.py looks for `_test_stall` there)."""

from __future__ import annotations

import os
import time


def _test_stall(phase: str, rank: int) -> None:
    """DOLLY_TEST_STALL="RANK:PHASE": that rank blocks forever when it enters that phase.
    Called at the start of every watchdog phase; the other phase hooks below run from here."""
    _test_missing_file(phase, rank)
    _test_stall_collective(phase, rank)
    spec = os.environ.get("DOLLY_TEST_STALL", "")
    if spec and spec == f"{rank}:{phase}":
        while True:
            time.sleep(0.2)


def _once(spec_var: str, phase: str, rank: int) -> str | None:
    """For DOLLY_TEST_*="RANK:PHASE:PATH" specs: PATH when this rank enters that phase, else None."""
    spec = os.environ.get(spec_var, "")
    parts = spec.split(":", 2)
    if len(parts) == 3 and parts[0] == str(rank) and parts[1] == phase:
        return parts[2]
    return None


def _test_missing_file(phase: str, rank: int) -> None:
    """DOLLY_TEST_LATE_FILE="RANK:PHASE:PATH": that rank opens PATH when it enters that phase (FileNotFoundError
    while PATH is missing); before raising it creates PATH.missed, so a test knows when to make PATH appear."""
    path = _once("DOLLY_TEST_LATE_FILE", phase, rank)
    if path is None:
        return
    try:
        open(path).close()
    except FileNotFoundError:
        open(f"{path}.missed", "a").close()
        raise


def _test_stall_collective(phase: str, rank: int) -> None:
    """DOLLY_TEST_STALL_COLLECTIVE="RANK:PHASE:MARKER": the first time (MARKER absent; it is created) that rank
    waits, inside torch.distributed, for a message no peer sends, so every rank ends up blocked in a collective
    (the others in their next all-reduce): a stalled collective. A restarted run finds MARKER and goes on."""
    marker = _once("DOLLY_TEST_STALL_COLLECTIVE", phase, rank)
    if marker is None or os.path.exists(marker):
        return
    open(marker, "w").close()
    import torch
    import torch.distributed as dist

    dist.recv(torch.zeros(1), src=(rank + 1) % dist.get_world_size())


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
