"""No run waits on a compiler or on a torch-extensions lock (trainer/ds_ops.py).

A stale lock is what a build killed mid-way leaves: `<extensions dir>/<op>/lock`, held by no process.
torch's JIT loader waits on it forever, silently; these tests plant one and expect a run to ignore it
(an op the run does not build) or to stop at once naming it (an op it would build)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainer import config as C
from trainer import ds_ops


def stale_lock(root: Path, op: str) -> Path:
    (root / op).mkdir(parents=True, exist_ok=True)
    lock = root / op / "lock"
    lock.write_text("")
    return lock


def test_check_locks_names_a_stale_lock_and_ignores_a_held_one(tmp_path):
    lock = stale_lock(tmp_path, "cpu_adam")
    with pytest.raises(ds_ops.StaleLockError, match=f"rm {lock}"):
        ds_ops.check_locks(["cpu_adam"], tmp_path)
    ds_ops.check_locks(["other_op"], tmp_path)  # no lock there
    fd = os.open(lock, os.O_RDONLY)  # a build in progress holds its lock file open (torch's FileBaton)
    try:
        assert ds_ops.holders(lock) == [os.getpid()]
        ds_ops.check_locks(["cpu_adam"], tmp_path)
    finally:
        os.close(fd)


def test_ops_needed_per_preset():
    assert ds_ops.ops_needed(C.load("cpu-tiny")) == []  # the CPU path builds nothing
    assert ds_ops.ops_needed(C.load("mistral-7b-zero3-offload")) == ["cpu_adam"]


SHM_PROBE = textwrap.dedent(
    """
    import os, time
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 1000), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    from trainer import ds_ops
    ds_ops.skip_unused_ops()
    import sys, deepspeed
    t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo")  # where DeepSpeed builds the op on CPU
    assert sys.modules["deepspeed.comm.comm"].cdb.shm_comm_op is None
    print("SKIPPED-IN", time.perf_counter() - t0)
    """
)


def test_cpu_path_does_not_build_the_shm_comm_op_despite_a_stale_lock(tmp_path):
    """DeepSpeed's CPU accelerator would JIT-build deepspeed_shm_comm when deepspeed.comm starts (and wait
    forever on this lock); after `skip_unused_ops` it neither builds nor waits."""
    lock = stale_lock(tmp_path, "deepspeed_shm_comm")
    proc = subprocess.run([sys.executable, "-c", SHM_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert proc.returncode == 0 and "SKIPPED-IN" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "built successfully" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "deepspeed_shm_comm").iterdir()) == ["lock"]  # nothing built
    assert lock.exists()


def test_train_with_a_stale_lock_of_an_op_it_would_build_fails_fast_naming_it(tmp_path, tiny_model_dir,
                                                                              synthetic_data_dir):
    """The offload preset JIT-builds cpu_adam (when not prebuilt): a stale lock stops the run in preflight,
    before Ray starts, with the path to delete (today's code started Ray and then waited forever)."""
    ext = tmp_path / "ext"
    lock = stale_lock(ext, "cpu_adam")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--config", "cpu-tiny", f"model.path={tiny_model_dir}",
         f"data.path={synthetic_data_dir}", f"checkpoint.storage_path={tmp_path / 'runs'}",
         "deepspeed.offload_optimizer=true", "schedule.max_steps=2"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"rm {lock}" in proc.stderr and "stale" in proc.stderr
    assert time.monotonic() - t0 < 60
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_a_prebuilt_op_is_used_only_when_built_for_these_versions(tmp_path):
    """`scripts/install.sh DS_OPS=...` leaves the library and a stamp of the torch/DeepSpeed versions; a run
    loads it only when both are there and the stamp matches (else it JIT-builds, lock-checked)."""
    assert not ds_ops.load_prebuilt("cpu_adam", tmp_path)  # nothing prebuilt
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"not loaded: the stamp does not match")
    (tmp_path / "cpu_adam" / "dolly-train-stamp.json").write_text('{"torch": "0.0", "deepspeed": "0.0"}')
    assert not ds_ops.load_prebuilt("cpu_adam", tmp_path)
