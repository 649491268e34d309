"""Reliability with the real trainer: DeepSpeed checkpoints damaged or out of space (world size 1, no Ray, in a
subprocess), and real Ray Train workers that stall in setup or run out of memory (`dolly-train train`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LOCAL = textwrap.dedent(
    """
    import os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import deepspeed
    from trainer import config as C
    from trainer.failures import FatalError
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    model_dir, data_dir, storage, steps = sys.argv[1:5]
    leave_mib = int(sys.argv[5]) if len(sys.argv) > 5 else None  # another writer fills the volume after setup
    cfg = C.load("cpu-tiny", [f"model.path={model_dir}", f"data.path={data_dir}", f"checkpoint.storage_path={storage}",
                              "checkpoint.run_name=local", "scaling.num_workers=1", f"schedule.max_steps={steps}",
                              "schedule.warmup_steps=0", "batch.micro_batch_size=2", "checkpoint.every_steps=2",
                              "logging.every_steps=1", "logging.eval_every_steps=100", "logging.eval_max_batches=1",
                              "checkpoint.export=false"])
    deepspeed.init_distributed(dist_backend="gloo")
    recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
    try:
        recipe.setup()
        if leave_mib is not None:
            import shutil
            free = shutil.disk_usage(storage).free
            with open(os.path.join(storage, "filler"), "wb") as f:
                f.write(bytes(max(0, free - leave_mib * 2**20)))  # real bytes: a sparse file takes no room
        recipe.train()
    except FatalError as e:
        print("FATAL:", e, file=sys.stderr)
        sys.exit(3)
    finally:
        recipe.cleanup()
    print("LOCAL-OK", recipe.progress.global_step)
    """
)


def run_local(model, data, storage, steps, leave_mib=None) -> subprocess.CompletedProcess:
    extra = [] if leave_mib is None else [str(leave_mib)]
    return subprocess.run([sys.executable, "-c", LOCAL, str(model), str(data), str(storage), str(steps), *extra],
                          capture_output=True, text=True, timeout=300)


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_truncated_shard_resumes_from_previous_checkpoint(tmp_path, tiny_model_dir, synthetic_data_dir):
    first = run_local(tiny_model_dir, synthetic_data_dir, tmp_path, 4)
    assert first.returncode == 0 and "LOCAL-OK 4" in first.stdout, first.stdout[-2000:] + first.stderr[-3000:]
    run = tmp_path / "local"
    assert (run / "checkpoint_00000002" / "COMPLETE.json").is_file()
    shards = sorted((run / "checkpoint_00000004" / "deepspeed" / "state").glob("*optim_states.pt"))
    assert shards
    with open(shards[0], "r+b") as fh:
        fh.truncate(shards[0].stat().st_size // 2)
    second = run_local(tiny_model_dir, synthetic_data_dir, tmp_path, 6)
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "LOCAL-OK 6" in second.stdout, out[-4000:]
    assert "skipping damaged checkpoint" in out and str(shards[0]) in out and "expected (truncated" in out
    assert f"resumed from {run / 'checkpoint_00000002'} at step 2" in out
    rows = train_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4, 5, 6]  # steps 3-4 repeated from the intact checkpoint
    assert all("mfu" not in r for r in rows)  # CPU: no known peak, no MFU


@pytest.fixture
def small_volume(tmp_path):
    """A 120 MiB tmpfs."""
    with tmpfs(tmp_path, "120m") as mnt:
        yield mnt


@contextlib.contextmanager
def tmpfs(tmp_path: Path, size: str):
    """A tmpfs of `size` at <tmp_path>/vol (needs root, as in CI here); skipped where mounting is not allowed."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_volume_fails_the_save_naming_path_and_bytes(small_volume, tmp_path, tiny_model_dir, synthetic_data_dir):
    """A ZeRO-2 checkpoint of the tiny model (5.2M fp32 parameters: weights, master copy, two Adam moments) is
    ~80 MiB: the first fits on 120 MiB, the second does not. The save fails
    before writing (the size of the previous checkpoint is known), and the first checkpoint stays intact."""
    from trainer import checkpointing as ck

    proc = run_local(tiny_model_dir, synthetic_data_dir, small_volume, 6)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]
    run = small_volume / "local"
    assert "FATAL: checkpoint save to " + str(run / ".checkpoint_00000004.tmp") in out, out[-3000:]
    assert "no space left on its volume" in out and "bytes (the size of the previous checkpoint)" in out
    ck.verify(run / "checkpoint_00000002")  # intact
    assert not (run / ".checkpoint_00000004.tmp").exists()


def test_volume_filling_mid_write_fails_naming_path(tmp_path, tiny_model_dir, synthetic_data_dir):
    """No previous checkpoint to size from: the volume has room for one checkpoint when the run starts (the
    preflight passes), then another writer fills it, and it runs out during the first save (ENOSPC inside
    torch.save)."""
    with tmpfs(tmp_path, "160m") as mnt:
        res = run_local(tiny_model_dir, synthetic_data_dir, mnt, 4, leave_mib=40)
        out = res.stdout + res.stderr
        assert res.returncode == 3, out[-4000:]
        assert "FATAL: checkpoint save to " in out and "no space left on its volume" in out
        assert "bytes written before the volume filled" in out
        assert not list((mnt / "local").glob("*checkpoint_*"))  # the partial folder is gone


def test_volume_too_small_for_one_checkpoint_is_refused_before_training(tmp_path, tiny_model_dir,
                                                                        synthetic_data_dir):
    """A volume that cannot hold one checkpoint of this model: refused at setup, naming the path and sizes."""
    with tmpfs(tmp_path, "40m") as mnt:
        res = run_local(tiny_model_dir, synthetic_data_dir, mnt, 4)
        out = res.stdout + res.stderr
        assert res.returncode == 3, out[-4000:]
        assert f"FATAL: {mnt / 'local'}: " in out and "GB free, but one full checkpoint" in out, out[-3000:]
        assert "checkpoint.save_optimizer_state=false" in out
        assert not (mnt / "local" / "metrics.jsonl").exists()  # refused before the first step


# ---- real Ray workers ------------------------------------------------------------------------------

def ray_train(tmp: Path, model: Path, data: Path, run: str, *extra: str, env: dict | None = None,
              timeout: int = 400) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", "cpu-tiny", f"model.path={model}",
           f"data.path={data}", f"checkpoint.storage_path={tmp}", f"checkpoint.run_name={run}",
           "data.max_length=512", "batch.micro_batch_size=2", "schedule.max_steps=4", "checkpoint.every_steps=2",
           "logging.every_steps=1", "checkpoint.max_failures=2", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    return proc, time.monotonic() - t0


def starts(pid_dir: Path) -> list[str]:
    return (pid_dir / "starts.log").read_text().split("\n")[:-1] if (pid_dir / "starts.log").exists() else []


def test_worker_stalled_in_setup_fails_the_run_within_the_limit(tmp_path, tiny_model_dir, synthetic_data_dir,
                                                                ray_cluster):
    """Rank 1 blocks in its data-load phase; with watchdog.setup_s=15 the run fails with the phase, the rank, the
    time and the stuck stack - and Ray Train does not restart it (max_failures=2)."""
    pid_dir = tmp_path / "pids"
    proc, wall = ray_train(tmp_path, tiny_model_dir, synthetic_data_dir, "stall", "watchdog.setup_s=15",
                           env={**ray_cluster, "DOLLY_TEST_STALL": "1:data load", "DOLLY_PID_DIR": str(pid_dir)})
    err = proc.stderr
    assert proc.returncode == 1, proc.stdout[-3000:] + err[-3000:]
    assert "rank 1 spent" in err and "in phase 'data load' (limit 15 s" in err, err[-3000:]
    assert "_test_stall" in err  # the stack of the stuck thread
    assert len(starts(pid_dir)) == 2, starts(pid_dir)  # one start per rank: no worker-group restart
    # from the moment rank 1 started its training function to the command's exit: the limit, Ray Train's next
    # poll and the teardown of the workers and the local cluster - never an open-ended wait
    spent = int(re.search(r"rank 1 spent (\d+) s", err).group(1))
    assert 15 <= spent <= 20, spent  # the watchdog fired on time
    since_start = time.time() - (pid_dir / "rank1.pid").stat().st_mtime
    assert since_start < 15 + 90, (since_start, wall, err[-3000:])


def test_oom_in_first_step_is_not_retried(tmp_path, tiny_model_dir, synthetic_data_dir, ray_cluster):
    pid_dir = tmp_path / "pids"
    proc, _ = ray_train(tmp_path, tiny_model_dir, synthetic_data_dir, "oom",
                        env={**ray_cluster, "DOLLY_TEST_OOM_AT_STEP": "1", "DOLLY_PID_DIR": str(pid_dir)})
    err = proc.stderr
    assert proc.returncode == 1, proc.stdout[-3000:] + err[-3000:]
    assert "dolly-train train: the run failed: rank 0: Out of GPU memory." in err, err[-3000:]
    assert "model.activation_checkpointing=true" in err
    assert len(starts(pid_dir)) == 2, starts(pid_dir)  # no worker-group restart despite max_failures=2


def test_sigterm_to_one_worker_saves_and_resumes(tmp_path, tiny_model_dir, synthetic_data_dir, ray_cluster):
    """SIGTERM to rank 1's real worker process mid-run (no periodic checkpoint in reach: every_steps=100): both
    ranks finish the step, save it together, and the restarted run resumes right after it - no step repeated."""
    import signal
    import threading

    pid_dir = tmp_path / "pids"
    run_dir = tmp_path / "term"
    sent: dict = {}

    def terminator():
        deadline = time.time() + 400
        while time.time() < deadline and not sent:
            rows = train_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            if rows and rows[-1]["step"] >= 3 and (pid_dir / "rank1.pid").exists():
                pid = int((pid_dir / "rank1.pid").read_text())
                os.kill(pid, signal.SIGTERM)
                sent["pid"], sent["after_step"] = pid, rows[-1]["step"]
            time.sleep(0.1)

    t = threading.Thread(target=terminator, daemon=True)
    t.start()
    proc, _ = ray_train(tmp_path, tiny_model_dir, synthetic_data_dir, "term", "schedule.max_steps=40",
                        "checkpoint.every_steps=100", env={**ray_cluster, "DOLLY_PID_DIR": str(pid_dir)}, timeout=500)
    t.join(timeout=5)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert sent, "SIGTERM was never sent"
    assert "rank 1: SIGTERM received" in out
    steps = [r["step"] for r in train_rows(run_dir)]
    resumed = re.search(r"resumed from (\S+) at step (\d+)", out)
    assert resumed, out[-4000:]
    saved = int(resumed.group(2))  # the step checkpointed on SIGTERM
    assert resumed.group(1) == str(run_dir / f"checkpoint_{saved:08d}")
    assert sent["after_step"] <= saved <= sent["after_step"] + 3, (sent, saved)
    assert steps == list(range(1, 41)), steps  # every step logged once: none lost, none repeated
    assert len(starts(pid_dir)) == 4, starts(pid_dir)  # one restart of the worker group


def test_stale_extension_lock_fails_naming_the_lock(tmp_path, tiny_model_dir, synthetic_data_dir, ray_cluster):
    """The issue's hang: a killed op build left `deepspeed_shm_comm/lock` in the torch-extensions cache, and
    `deepspeed.initialize` waited on it forever. Now the run fails within watchdog.setup_s, naming the lock (or,
    where the op is prebuilt and nothing is built at run time, finishes)."""
    ext = tmp_path / "torch_extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    pid_dir = tmp_path / "pids"
    proc, _ = ray_train(tmp_path, tiny_model_dir, synthetic_data_dir, "lock", "watchdog.setup_s=20",
                        env={**ray_cluster, "TORCH_EXTENSIONS_DIR": str(ext), "DOLLY_PID_DIR": str(pid_dir)})
    err = proc.stderr
    if proc.returncode == 0:  # DeepSpeed's op was prebuilt (no run-time build): nothing waits on the lock
        assert (tmp_path / "lock" / "export" / "model.safetensors").is_file()
        return
    assert proc.returncode == 1, proc.stdout[-3000:] + err[-3000:]
    assert "in phase 'deepspeed.initialize' (limit 20 s" in err and str(lock) in err, err[-3000:]
    assert len(starts(pid_dir)) == 2, starts(pid_dir)  # not retried: a restart would wait on the same lock


# ---- transient vs certain: Ray Train retries the first kind only ------------------------------------------

def test_file_that_appears_a_moment_later_is_retried(tmp_path, tiny_model_dir, synthetic_data_dir, ray_cluster):
    """Rank 0 reads a file a network volume shows late: missing at the first read (FileNotFoundError), there a
    moment later. Before: fatal, the run ended. Now: Ray Train restarts the workers and the run finishes."""
    import threading

    pid_dir, late = tmp_path / "pids", tmp_path / "volume" / "late.arrow"
    late.parent.mkdir()

    def volume():  # the file shows up once the worker has looked for it and failed
        deadline = time.time() + 300
        while time.time() < deadline and not Path(f"{late}.missed").exists():
            time.sleep(0.1)
        time.sleep(1.0)
        late.write_text("x")

    t = threading.Thread(target=volume, daemon=True)
    t.start()
    proc, _ = ray_train(tmp_path, tiny_model_dir, synthetic_data_dir, "late", "schedule.max_steps=2",
                        "checkpoint.export=false",
                        env={**ray_cluster, "DOLLY_TEST_LATE_FILE": f"0:data load:{late}",
                             "DOLLY_MISSING_FILE_GRACE_S": "60", "DOLLY_PID_DIR": str(pid_dir)})
    t.join(timeout=5)
    out = proc.stdout + proc.stderr
    assert Path(f"{late}.missed").exists(), "the worker never missed the file"
    assert proc.returncode == 0, out[-4000:]
    assert len(starts(pid_dir)) == 4, starts(pid_dir)  # one restart of the worker group
    assert [r["step"] for r in train_rows(tmp_path / "late")] == [1, 2]


def test_file_still_missing_is_not_retried(tmp_path, tiny_model_dir, synthetic_data_dir, ray_cluster):
    """The same read of a file that never comes (a wrong path, a model dir absent at start): fatal after the grace
    period, named, and not retried despite max_failures=2."""
    pid_dir, never = tmp_path / "pids", tmp_path / "volume" / "never.arrow"
    proc, _ = ray_train(tmp_path, tiny_model_dir, synthetic_data_dir, "never", "checkpoint.export=false",
                        env={**ray_cluster, "DOLLY_TEST_LATE_FILE": f"0:data load:{never}",
                             "DOLLY_MISSING_FILE_GRACE_S": "2", "DOLLY_PID_DIR": str(pid_dir)})
    err = proc.stderr
    assert proc.returncode == 1, proc.stdout[-3000:] + err[-3000:]
    assert "rank 0: missing file (not retried: still missing 2 s later)" in err and str(never) in err, err[-3000:]
    assert len(starts(pid_dir)) == 2, starts(pid_dir)


def test_one_stalled_collective_is_retried_from_the_checkpoint(tmp_path, tiny_model_dir, synthetic_data_dir,
                                                               ray_cluster):
    """Rank 1 blocks in torch.distributed in step 3 (once), so both ranks wait in a collective until the watchdog
    fires (step_s=30). Before: every watchdog timeout was fatal. Now: Ray Train restarts the workers from
    checkpoint 2 and the run finishes; no step is lost or logged twice."""
    pid_dir, marker = tmp_path / "pids", tmp_path / "stalled-once"
    proc, _ = ray_train(tmp_path, tiny_model_dir, synthetic_data_dir, "stall1", "watchdog.step_s=30",
                        "checkpoint.export=false",
                        env={**ray_cluster, "DOLLY_TEST_STALL_COLLECTIVE": f"1:optimizer step 3:{marker}",
                             "DOLLY_PID_DIR": str(pid_dir)}, timeout=500)
    out = proc.stdout + proc.stderr
    assert marker.exists(), "rank 1 never stalled"
    assert proc.returncode == 0, out[-4000:]
    assert "in phase 'optimizer step 3' (limit 30 s" in out and "It waits in a collective" in out, out[-4000:]
    assert len(starts(pid_dir)) == 4, starts(pid_dir)  # one restart
    assert re.search(r"resumed from \S+checkpoint_00000002 at step 2", out), out[-4000:]
    assert [r["step"] for r in train_rows(tmp_path / "stall1")] == [1, 2, 3, 4]
