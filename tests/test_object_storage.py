"""The run dir on object storage (`checkpoint.storage_path: s3://...`), against a real S3-compatible HTTP server:
moto's server mode (`moto_server`, from its own venv: scripts/moto.sh), started by these tests on 127.0.0.1 and
stopped by them. The client is the one the product and Ray use, `pyarrow.fs.S3FileSystem` (no mock); the endpoint
and the credentials reach it the way they reach a pod: `AWS_ENDPOINT_URL` and a shared credentials file."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SESSION_TMP, ray_head

BUCKET = "dolly-runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_bin() -> Path:
    """DOLLY_MOTO_SERVER, else .tools/moto (made by scripts/moto.sh when missing; a failed install fails)."""
    if os.environ.get("DOLLY_MOTO_SERVER"):
        return Path(os.environ["DOLLY_MOTO_SERVER"])
    venv = REPO / ".tools" / "moto"
    subprocess.run(["bash", str(REPO / "scripts" / "moto.sh"), str(venv)], check=True, cwd=REPO, timeout=600)
    return venv / "bin" / "moto_server"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> dict[str, str]:
    """A running S3 server with bucket `dolly-runs`; returns the environment a pod would have for it."""
    import pyarrow.fs

    port = _free_port()
    log = (SESSION_TMP / "moto.log").open("w")
    proc = subprocess.Popen([str(moto_server_bin()), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (SESSION_TMP / "moto.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline, "moto_server did not answer within 60 s"
                time.sleep(0.3)
        creds = tmp_path_factory.mktemp("aws") / "credentials"
        creds.write_text("[default]\naws_access_key_id = dolly-test\naws_secret_access_key = dolly-test-secret\n")
        pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="dolly-test",
                                secret_key="dolly-test-secret", region="us-east-1",
                                allow_bucket_creation=True).create_dir(BUCKET)
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_SHARED_CREDENTIALS_FILE": str(creds),
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    return s3


def listing(prefix: str) -> dict[str, int]:
    """key (relative to s3://BUCKET/prefix/) -> size, read straight from the server."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}


def read(key: str) -> bytes:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}/{key}")
    with fs.open_input_stream(path) as f:
        return f.read()


def test_storage_helpers_round_trip_through_the_server(s3_env, tmp_path):
    from trainer import storage

    (tmp_path / "tb" / "sub").mkdir(parents=True)
    (tmp_path / "tb" / "sub" / "events.1").write_bytes(b"\x00" * 1000)
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n')
    storage.upload_file(tmp_path / "m.jsonl", f"s3://{BUCKET}/h/run/metrics.jsonl")
    storage.upload_dir(tmp_path / "tb", f"s3://{BUCKET}/h/run/tensorboard")
    assert listing("h/run") == {"metrics.jsonl": 12, "tensorboard/sub/events.1": 1000}
    assert storage.download_file(f"s3://{BUCKET}/h/run/metrics.jsonl", tmp_path / "back" / "m.jsonl")
    assert (tmp_path / "back" / "m.jsonl").read_text() == '{"step": 1}\n'
    assert not storage.download_file(f"s3://{BUCKET}/h/run/nothing", tmp_path / "none")
    assert not (tmp_path / "none").exists()
    # config history: appended across runs, with the changed keys named
    storage.record_config(f"s3://{BUCKET}/h/run", {"schedule": {"max_steps": 4}, "seed": 1})
    storage.record_config(f"s3://{BUCKET}/h/run", {"schedule": {"max_steps": 6}, "seed": 1})
    history = [json.loads(line) for line in read("h/run/config_history.jsonl").decode().splitlines()]
    assert [h["changed"] for h in history] == [[], [{"key": "schedule.max_steps", "old": 4, "new": 6}]]
    assert yaml.safe_load(read("h/run/config.yaml")) == {"schedule": {"max_steps": 6}, "seed": 1}


def _train(model, data, run: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", "cpu-tiny", f"model.path={model}",
           f"data.path={data}", f"checkpoint.storage_path=s3://{BUCKET}/runs", f"checkpoint.run_name={run}",
           "batch.micro_batch_size=2", "checkpoint.every_steps=2", "logging.every_steps=1", "schedule.warmup_steps=0",
           "logging.eval_every_steps=100", "logging.eval_max_batches=1", "checkpoint.max_failures=0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def _scratch_dirs() -> set[Path]:
    tmp = Path(os.environ["TMPDIR"])
    return {p for pat in ("dolly-resume-*", "dolly-metrics-*", "dolly-export-*", "dolly-config-*")
            for p in tmp.glob(pat)}


@pytest.mark.slow
def test_run_dir_on_s3_keeps_metrics_logs_events_history_and_resumes(s3_env, tiny_model_dir, synthetic_data_dir):
    """Two real `dolly-train train` runs (2 CPU workers) on a Ray node whose environment holds the endpoint and the
    credentials file, as a pod's would: 4 steps, then a resume to 6 (a safe change). The bucket ends with every
    file the run dir has on a filesystem, metrics continuous across the resume; the checkpoint the resume
    downloaded and every other local scratch dir are gone."""
    before = _scratch_dirs()
    secret_env = {"HF_TOKEN": "hf_dolly_test_not_a_real_token"}  # the driver's; must not travel in the runtime env
    t0 = time.monotonic()
    with ray_head(s3_env, name="ray-head-s3") as run_env:
        t_head = time.monotonic() - t0
        env = {**s3_env, **run_env, **secret_env}
        first = _train(tiny_model_dir, synthetic_data_dir, "s3run", env, "schedule.max_steps=4",
                       "checkpoint.export=false")
        out1 = first.stdout + first.stderr
        assert first.returncode == 0, out1[-4000:]
        assert "not passed through Ray's runtime env (secrets): HF_TOKEN" in out1
        second = _train(tiny_model_dir, synthetic_data_dir, "s3run", env, "schedule.max_steps=6",
                        "checkpoint.export=true")
        out2 = second.stdout + second.stderr
        assert second.returncode == 0, out2[-4000:]
    print(f"ray head {t_head:.0f} s, both runs {time.monotonic() - t0 - t_head:.0f} s")

    resumed = re.search(r"resumed from (\S+) at step (\d+)", out2)
    assert resumed and resumed.group(2) == "4", out2[-4000:]
    local_copy = Path(resumed.group(1))
    assert "dolly-resume-" in str(local_copy) and not local_copy.exists()  # downloaded, then removed
    assert _scratch_dirs() <= before, _scratch_dirs() - before

    files = listing("runs/s3run")
    rows = [json.loads(line) for line in read("runs/s3run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # one file across the resume
    assert [r["step"] for r in rows if r["kind"] == "checkpoint"] == [2, 4, 6]
    events = [k for k in files if k.startswith("tensorboard/") and "tfevents" in k]
    assert len(events) == 2 and all(files[k] > 0 for k in events), files  # one events file per run
    logs = [k for k in files if re.fullmatch(r"logs/train-\d{8}-\d{6}\.log", k)]
    assert len(logs) == 2 and any(b"resumed from" in read(f"runs/s3run/{k}") for k in logs), files
    history = [json.loads(line) for line in read("runs/s3run/config_history.jsonl").decode().splitlines()]
    assert len(history) == 2 and {"key": "schedule.max_steps", "old": 4, "new": 6} in history[1]["changed"]
    assert {"key": "checkpoint.export", "old": False, "new": True} in history[1]["changed"]
    assert yaml.safe_load(read("runs/s3run/config.yaml"))["schedule"]["max_steps"] == 6
    assert "export/model.safetensors" in files and "export/config.json" in files
    assert any(k.startswith("checkpoint_00000006/") and k.endswith("COMPLETE.json") for k in files), files
