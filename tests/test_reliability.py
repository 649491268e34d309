"""Reliability without Ray: the watchdog, failure classification, checkpoint integrity, resume config checks,
too-few-records in prepare (docs/operations.md). The Ray-worker versions are in test_reliability_ray.py."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import yaml

from trainer import checkpointing as ck
from trainer import config as C
from trainer.cli import main
from trainer.failures import FatalError, RunAborted, classify, is_fatal, root_cause, stop_on_fatal_callback
from trainer.tiny_model import write_tokenizer
from trainer.watchdog import PhaseTimeout, Watchdog


# ---- the watchdog ---------------------------------------------------------------------------------

def _stuck_in_phase(wd: Watchdog, name: str, limit: float, body, box: dict) -> threading.Thread:
    def target():
        t0 = time.monotonic()
        try:
            with wd.phase(name, limit):
                body()
        except PhaseTimeout as e:
            box["error"], box["after_s"] = e, time.monotonic() - t0

    t = threading.Thread(target=target, name="TrainingThread(test)", daemon=True)
    t.start()
    return t


def _sleep_forever_in_setup():
    while True:
        time.sleep(0.05)


def test_watchdog_fails_a_stuck_phase_naming_phase_rank_time_and_stack():
    wd = Watchdog(rank=3, poll_s=0.1)
    box: dict = {}
    t = _stuck_in_phase(wd, "data load", 1.0, _sleep_forever_in_setup, box)
    t.join(timeout=10)
    wd.close()
    assert not t.is_alive(), "the stuck thread was never interrupted"
    msg = str(box["error"])
    assert 1.0 <= box["after_s"] < 30.0, box["after_s"]  # on time, with slack for a loaded 2-core machine
    assert "rank 3" in msg and "phase 'data load'" in msg and "limit 1 s" in msg
    assert "_sleep_forever_in_setup" in msg  # the stuck thread's stack
    assert is_fatal(box["error"])


def test_watchdog_names_a_stale_torch_extensions_lock(tmp_path, monkeypatch):
    """The hang of the issue: a killed op build left `lock`; FileBaton.wait() waits on it forever."""
    from torch.utils.file_baton import FileBaton

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    wd = Watchdog(rank=0, poll_s=0.1)
    box: dict = {}
    t = _stuck_in_phase(wd, "deepspeed.initialize", 1.0, lambda: FileBaton(str(lock)).wait(), box)
    t.join(timeout=10)
    wd.close()
    msg = str(box["error"])
    assert "phase 'deepspeed.initialize'" in msg and str(lock) in msg and "delete it" in msg
    assert "file_baton" in msg


def test_watchdog_is_quiet_when_phases_finish_in_time():
    wd = Watchdog(rank=0, poll_s=0.05)
    for _ in range(20):
        with wd.phase("optimizer step", 0.5):
            time.sleep(0.01)
    time.sleep(0.7)  # longer than the limit, outside any phase
    assert wd._fired is None
    wd.close()


# ---- failures a restart would repeat ----------------------------------------------------------------

def test_classify_fatal_and_retryable():
    import torch

    oom = classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert isinstance(oom, FatalError) and "activation_checkpointing" in str(oom) and "Tried to allocate" in str(oom)
    assert isinstance(classify(C.ConfigError("batch.micro_batch_size: bad")), FatalError)
    missing = classify(FileNotFoundError(2, "No such file", "/x/tokenized/train"), missing_file_grace_s=0.3)
    assert isinstance(missing, FatalError) and "still missing" in str(missing)
    assert isinstance(classify(FileNotFoundError("no path named")), FatalError)  # nothing to look for: certain
    assert isinstance(classify(ModuleNotFoundError("No module named 'flash_attn'")), FatalError)
    assert isinstance(classify(OSError(28, "No space left on device")), FatalError)
    # a crash a restart may fix stays retryable
    assert classify(RuntimeError("Connection reset by peer")) is None
    assert classify(ConnectionError("gloo")) is None


def test_missing_file_that_appears_is_retried(tmp_path):
    """A file a network volume shows late: missing when read, there a moment later. A restart would find it, so
    it is retryable; one that stays missing through the grace period is not (a wrong path, a missing model dir)."""
    import threading

    late = tmp_path / "late" / "train.arrow"
    t = threading.Timer(0.8, lambda: (late.parent.mkdir(), late.write_text("x")))
    t.start()
    t0 = time.monotonic()
    assert classify(FileNotFoundError(2, "No such file or directory", str(late)), missing_file_grace_s=20) is None
    assert 0.7 < time.monotonic() - t0 < 10  # waited for it, not the whole grace period
    t.join()
    gone = tmp_path / "models" / "mistral"
    t0 = time.monotonic()
    fatal = classify(FileNotFoundError(2, "No such file or directory", str(gone)), missing_file_grace_s=1.0)
    assert isinstance(fatal, FatalError) and str(gone) in str(fatal) and time.monotonic() - t0 >= 1.0


def test_watchdog_timeout_in_a_collective_is_retryable_elsewhere_fatal():
    """The verdict comes from the stuck thread's stack: a thread really blocked inside torch.distributed (rank 0 of a
    2-rank gloo group whose rank 1 never comes) is in a collective, so retryable; this test's own frames are not.
    The whole path, a stalled collective in real Ray Train workers, is in tests/test_reliability_ray.py."""
    from trainer.watchdog import in_collective

    assert PhaseTimeout("x").dolly_fatal and classify(PhaseTimeout("x")) is not None
    retry = PhaseTimeout("x", retryable=True)
    assert classify(retry) is None
    stop_on_fatal_callback().after_exception(None, {0: retry, 1: retry})  # no RunAborted: Ray Train retries

    import torch.distributed as dist

    store = dist.HashStore()
    started = threading.Event()

    def blocked_in_c10d():
        started.set()
        try:  # rank 0 of 2: the rendezvous waits in distributed_c10d for a rank 1 that never comes
            dist.init_process_group("gloo", store=store, rank=0, world_size=2, timeout=datetime.timedelta(seconds=4))
        except Exception:
            pass

    th = threading.Thread(target=blocked_in_c10d, daemon=True)
    th.start()
    started.wait()
    time.sleep(1.0)
    stack = "".join(traceback.format_stack(sys._current_frames()[th.ident]))
    th.join(timeout=30)
    assert in_collective(stack), stack
    assert not in_collective("".join(traceback.format_stack()))  # this test's own frames


def test_controller_callback_stops_only_on_fatal_errors():
    from ray.exceptions import ActorDiedError

    cb = stop_on_fatal_callback()
    cb.after_exception(None, {1: ActorDiedError()})  # a killed worker: Ray Train retries
    cb.after_exception(None, {0: RuntimeError("transient")})
    with pytest.raises(RunAborted, match=r"rank 1: .*Out of GPU memory"):
        cb.after_exception(None, {0: RuntimeError("collateral"), 1: classify(__import__("torch").OutOfMemoryError("x"))})


def test_root_cause_reads_ray_errors():
    from ray.train import ControllerError, WorkerGroupError

    assert root_cause(ControllerError(RunAborted("rank 0: boom"))) == "rank 0: boom"
    assert root_cause(WorkerGroupError("x", {1: ValueError("bad")})) == "rank 1: bad"


# ---- checkpoint integrity ------------------------------------------------------------------------

def _fake_checkpoint(run: Path, step: int, cfg: dict | None = None) -> Path:
    d = run / f"checkpoint_{step:08d}"
    (d / "deepspeed" / "state").mkdir(parents=True)
    (d / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
    (d / "progress.json").write_text(json.dumps({"global_step": step}))
    if cfg is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    ck.write_manifest(d, step, world_size=1)
    return d


def test_truncated_or_unfinished_checkpoint_is_skipped_for_the_previous(tmp_path):
    a, b = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    assert ck.latest_valid(ck.checkpoints(tmp_path)) == b
    shard = b / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as fh:
        fh.truncate(100)
    warnings: list[str] = []
    assert ck.latest_valid(ck.checkpoints(tmp_path), warn=warnings.append) == a
    assert len(warnings) == 1 and str(shard) in warnings[0] and "100 bytes, 4096 expected" in warnings[0]
    c = _fake_checkpoint(tmp_path, 6)
    (c / ck.MANIFEST).unlink()  # killed before the save finished
    warnings.clear()
    assert ck.latest_valid(ck.checkpoints(tmp_path), warn=warnings.append) == a
    assert "no COMPLETE.json" in warnings[0] and "truncated" in warnings[1]


def test_free_space_check_names_path_and_bytes(tmp_path):
    with pytest.raises(FatalError, match=r"checkpoint save to .*x.* failed: no space left .* about 10,000,000,000,000,000 bytes"):
        ck.check_free_space(tmp_path / "x", 10**16)
    ck.check_free_space(tmp_path / "x", 1)


# ---- resume config checks ---------------------------------------------------------------------------

def _cfg(*overrides: str) -> dict:
    return C.load("cpu-tiny", list(overrides)).to_dict()


def test_unsafe_config_changes_are_named_and_safe_ones_pass():
    old = _cfg()
    new = _cfg("scaling.num_workers=4", "batch.micro_batch_size=8", "batch.gradient_accumulation_steps=2",
               "data.max_length=1024", "schedule.max_steps=500", "logging.every_steps=1", "deepspeed.stage=3")
    keys = [k for k, _, _ in ck.unsafe_changes(old, new)]
    assert keys == ["batch.gradient_accumulation_steps", "batch.micro_batch_size", "data.max_length",
                    "deepspeed.stage", "scaling.num_workers"]
    assert ck.unsafe_changes(old, _cfg("schedule.max_steps=500", "logging.every_steps=1", "watchdog.step_s=60",
                                       "checkpoint.keep=5")) == []


def test_train_refuses_an_unsafe_resume_before_starting_ray(tmp_path, tiny_model_dir, synthetic_data_dir):
    base = [f"model.path={tiny_model_dir}", f"data.path={synthetic_data_dir}", f"checkpoint.storage_path={tmp_path}",
            "checkpoint.run_name=r"]
    saved = C.load("cpu-tiny", base).to_dict()
    _fake_checkpoint(tmp_path / "r", 6, saved)
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # would fail loudly if the command tried to reach Ray
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", "--config", "cpu-tiny", *base,
                           "batch.micro_batch_size=2", "scaling.num_workers=1"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "batch.micro_batch_size: 4 -> 2" in proc.stderr and "scaling.num_workers: 2 -> 1" in proc.stderr
    assert "checkpoint_00000006" in proc.stderr


def test_config_history_records_each_run(tmp_path):
    ck.record_config(tmp_path, _cfg())
    ck.record_config(tmp_path, _cfg("schedule.max_steps=9"), ck.changed_keys(_cfg(), _cfg("schedule.max_steps=9")))
    rows = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["changed"] == [{"key": "schedule.max_steps", "old": None, "new": 9}]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["schedule"]["max_steps"] == 9


# ---- bad small inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2])
def test_prepare_with_too_few_records_exits_nonzero(tmp_path, capsys, n):
    from trainer.data.synthetic import generate

    tok = tmp_path / "tok"
    tok.mkdir()
    write_tokenizer(tok)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in generate(n, seed=1)))
    rc = main(["prepare", "--source", "jsonl", "--path", str(src), "--tokenizer", str(tok), "--max-length", "512",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{n} usable record" in err and "at least 3" in err, err
    assert not (tmp_path / "out").exists()


# ---- preemption: the chart gives the workers time to save -------------------------------------------

def test_chart_sets_worker_termination_grace_period(repo):
    import k8s_validate as kv

    chart = repo / "charts" / "dolly-train"

    def grace(*args: str) -> list[int]:
        res = subprocess.run([kv.tool("helm"), "template", "x", str(chart), *args], capture_output=True, text=True,
                             timeout=60, check=True)
        objs = [o for o in yaml.safe_load_all(res.stdout) if o]
        out = []
        for o in objs:
            spec = o.get("spec", {})
            cluster = spec.get("rayClusterSpec", spec)
            for g in cluster.get("workerGroupSpecs", []) if isinstance(cluster, dict) else []:
                out.append(g["template"]["spec"]["terminationGracePeriodSeconds"])
        return out

    assert set(grace()) == {300}
    assert set(grace("--set", "worker.terminationGracePeriodSeconds=120")) == {120}


def test_sigterm_handler_registers_its_process_for_the_prestop_hook(tmp_path, monkeypatch, capsys):
    """While the handler is installed the process is announced in DOLLY_SIGTERM_PID_DIR (file = pid, content = the
    start time from /proc/<pid>/stat, which the chart's hook compares before signalling); uninstall removes it."""
    from trainer import preemption

    pid_dir = tmp_path / "sigterm"
    monkeypatch.setenv(preemption.PID_DIR_ENV, str(pid_dir))
    stop = preemption.StopOnSigterm(0).install()
    try:
        entry = pid_dir / str(os.getpid())
        fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
        assert entry.read_text().strip() == fields[19]  # field 22 of stat: the start time
        assert [p.name for p in pid_dir.iterdir()] == [entry.name]  # no temp file left behind
    finally:
        stop.uninstall()
    assert not entry.exists()
    # an unwritable directory: a warning, and the handler still works
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(preemption.PID_DIR_ENV, str(blocker / "sub"))
    stop = preemption.StopOnSigterm(0).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested.wait(5)
    finally:
        stop.uninstall()
    assert "cannot register for the preStop hook" in capsys.readouterr().out


# ---- quiet by default ------------------------------------------------------------------------------------

def test_quiet_output_shows_product_lines_and_logs_everything(tmp_path):
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from trainer.quiet import quiet_output\n"
        "with quiet_output(Path(sys.argv[1])):\n"
        "    print('Reporting training result 1: TrainingReport(...)', flush=True)\n"
        "    print('\\x1b[36m(RayTrainWorker pid=123, ip=1.2.3.4)\\x1b[0m [dolly-train] step=3 loss=9.1', flush=True)\n"
        "    os.write(2, b'Failed to query Ray Train Controller actor state\\n')\n"
        "    print('[dolly-train] resumed from x', file=sys.stderr, flush=True)\n"
        "print('after', flush=True)\n"
    )
    log = tmp_path / "logs" / "train.log"
    proc = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout.splitlines()
    assert shown == [f"[dolly-train] full log (Ray, DeepSpeed): {log}  (--verbose prints it here)",
                     "[dolly-train] step=3 loss=9.1", "[dolly-train] resumed from x", "after"], shown
    assert proc.stderr == ""
    text = log.read_text()
    assert "Reporting training result" in text and "Failed to query Ray Train Controller" in text
