"""Progress on the RayJob (trainer/progress.py) and where users read it (`dolly-train status|wait`).

The API server is the local one of tests/test_k8s_client.py (bearer-token auth, merge-patch content type checked);
the publisher speaks to it over HTTP with a token file, as it does in a pod with the service-account token.
"""

from __future__ import annotations

import json
import re
import socket
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("kubernetes", reason="the k8s extra provides the kubernetes client (status / wait)")

from test_k8s_client import NS, TOKEN, FakeKube, _start, api, kube, put_rayjob, rayjob_status, run  # noqa: E402,F401
from trainer import progress  # noqa: E402


@pytest.fixture
def server(kube):
    srv = _start(kube)
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    return f


def target(api_url: str, token_file, name: str = "tiny") -> progress.Target:
    env = {progress.ENV_NAME: name, progress.ENV_NAMESPACE: NS, progress.ENV_API: api_url,
           progress.ENV_TOKEN_FILE: str(token_file)}
    return progress.Target.from_env(env)


def annotation(kube: FakeKube, name: str = "tiny") -> dict:
    return json.loads(kube.objects[("rayjobs", NS, name)]["metadata"]["annotations"][progress.ANNOTATION])


def patches(kube: FakeKube) -> list[dict]:
    return [r for r in kube.requests if r["method"] == "PATCH"]


def test_target_from_env_only_with_a_rayjob_name(token_file):
    assert progress.Target.from_env({}) is None
    t = progress.Target.from_env({progress.ENV_NAME: "run", "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                  "KUBERNETES_SERVICE_PORT": "443", progress.ENV_NAMESPACE: "ml"})
    assert t.url == "https://10.96.0.1:443/apis/ray.io/v1/namespaces/ml/rayjobs/run?fieldManager=dolly-train-progress"
    assert t.token_file == f"{progress.SA_DIR}/token" and t.ca_file == f"{progress.SA_DIR}/ca.crt"
    t = target("http://127.0.0.1:1", token_file)
    assert t.ca_file is None and t.url.startswith(f"http://127.0.0.1:1/apis/ray.io/v1/namespaces/{NS}/rayjobs/tiny?")


def test_tracker_publishes_the_summary_as_a_merge_patch_of_the_annotation(kube, server, token_file):
    put_rayjob(kube, "tiny", [])
    tracker = progress.Tracker(total_steps=1200, start_step=0, run="r", publisher=progress.Publisher(target(server, token_file)))
    tracker.update("train", {"step": 10, "epoch": 0.025, "loss": 2.34567, "tokens_per_s": 8315.26})
    tracker.publisher.close()
    first = annotation(kube)
    assert set(first) == set(progress.FIELDS)
    assert first["step"] == 10 and first["total_steps"] == 1200 and first["percent"] == pytest.approx(0.8)
    assert first["loss"] == 2.3457 and first["tokens_per_s"] == 8315.3 and first["epoch"] == 0.025
    assert first["val_loss"] is None and first["last_checkpoint"] is None
    assert isinstance(first["eta_seconds"], int) and first["eta_seconds"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["updated_at"])

    tracker.publisher = progress.Publisher(target(server, token_file))
    tracker.update("eval", {"step": 20, "val_loss": 2.0})
    tracker.update("checkpoint", {"step": 20, "checkpoint": "checkpoint_00000020", "save_seconds": 1.5})
    tracker.publisher.close()
    last = annotation(kube)
    assert last["step"] == 20 and last["val_loss"] == 2.0 and last["last_checkpoint"] == "checkpoint_00000020"
    assert last["loss"] == first["loss"]  # kept from the last training window
    for r in patches(kube):
        assert r["content_type"] == "application/merge-patch+json"
        assert r["path"] == f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/tiny"
        assert r["query"] == {"fieldManager": "dolly-train-progress"}
        assert list(r["body"]) == ["metadata"] and list(r["body"]["metadata"]) == ["annotations"]
    spec = kube.objects[("rayjobs", NS, "tiny")]["spec"]
    assert spec["entrypoint"].startswith("dolly-train train")  # nothing but the annotation changed


def _silent_server():
    """A TCP server that accepts connections and never answers: an API server that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_an_unreachable_api_never_blocks_training_warns_once_and_sends_the_newest_later(kube, server, token_file,
                                                                                          capsys):
    put_rayjob(kube, "tiny", [])
    hang = _silent_server()
    t = target(f"http://127.0.0.1:{hang.getsockname()[1]}", token_file)
    pub = progress.Publisher(t, timeout=0.3, backoff=(0.2, 0.4))
    tracker = progress.Tracker(total_steps=100, start_step=0, run="r", publisher=pub)
    start = time.monotonic()
    for step in range(1, 51):
        tracker.update("train", {"step": step, "loss": 1.0 / step, "tokens_per_s": 100.0, "epoch": step / 100})
    assert time.monotonic() - start < 0.5  # 50 updates while every patch hangs: the training thread never waits
    time.sleep(1.5)  # several failed tries (0.3 s timeout, 0.2-0.4 s backoff)
    out = capsys.readouterr().out
    assert out.count("cannot publish progress to RayJob") == 1, out
    assert "training goes on" in out
    tracker.update("train", {"step": 51, "loss": 0.5, "tokens_per_s": 100.0, "epoch": 0.51})
    t.api = server  # the API server is back (after the newest summary replaced the pending one)
    deadline = time.monotonic() + 10
    while not patches(kube) and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.close()
    hang.close()
    sent = [r["body"]["metadata"]["annotations"][progress.ANNOTATION] for r in patches(kube)]
    assert [json.loads(s)["step"] for s in sent] == [51]  # the 50 stale summaries were dropped, not queued
    assert "published to RayJob dolly-train/tiny again" in capsys.readouterr().out


def test_rejected_patch_is_a_warning_not_an_error(kube, server, tmp_path, capsys):
    put_rayjob(kube, "tiny", [])
    bad = tmp_path / "bad-token"
    bad.write_text("wrong")
    pub = progress.Publisher(target(server, bad), timeout=1, backoff=(10, 10))
    recipe = SimpleNamespace(is_main=True, _progress_tracker=progress.Tracker(10, 0, "r", pub))
    progress.report(recipe, "train", {"step": 1, "loss": 1.0, "tokens_per_s": 1.0, "epoch": 0.1})
    progress.close(recipe)  # in backoff: returns without waiting 10 s
    assert "HTTP 401" in capsys.readouterr().out
    assert pub.sent == 0
    progress.report(SimpleNamespace(is_main=False), "train", {"step": 1})  # other ranks: nothing at all


def test_line_and_duration():
    s = {"step": 370, "total_steps": 1200, "percent": 30.8, "eta_seconds": 2520, "loss": 1.2134, "tokens_per_s": 8315.2}
    assert progress.line(s) == "step 370/1,200 (31%), ETA 42 min, loss 1.21, 8,315 tokens/s"
    assert [progress.duration(x) for x in (None, 5, 59, 60, 5399, 10000)] == ["-", "5 s", "59 s", "1 min", "90 min",
                                                                             "2 h 47 min"]


SUMMARY = {"step": 370, "total_steps": 1200, "epoch": 0.925, "percent": 30.8, "eta_seconds": 2520, "loss": 1.2134,
           "val_loss": 1.25, "tokens_per_s": 8315.2, "last_checkpoint": "checkpoint_00000300",
           "updated_at": "2026-11-29T08:40:00Z"}


def _with_progress(kube, name, summary):
    kube.objects[("rayjobs", NS, name)]["metadata"]["annotations"] = {progress.ANNOTATION: json.dumps(summary)}


def test_status_prints_phase_and_progress_table_and_json(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING")])
    _with_progress(kube, "tiny", SUMMARY)
    assert run(api, "status", "tiny", "-n", NS) == 0
    out = capsys.readouterr().out
    assert re.search(r"deployment\s+Running", out) and re.search(r"job status\s+RUNNING", out)
    for row in (r"step\s+370/1200 \(30\.8%\)", r"eta\s+42 min", r"loss\s+1\.2134", r"val loss\s+1\.2500",
                r"tokens/s\s+8,315", r"last checkpoint\s+checkpoint_00000300",
                r"updated\s+\d+ (s|min|h \d+ min) ago \(2026-11-29T08:40:00Z\)"):
        assert re.search(row, out), row
    assert run(api, "status", "tiny", "-n", NS, "-o", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["jobDeploymentStatus"] == "Running" and data["outcome"] == "running"
    assert {k: data["progress"][k] for k in SUMMARY} == SUMMARY and data["progress"]["age_seconds"] > 0
    put_rayjob(kube, "fresh", [rayjob_status("Initializing")])
    assert run(api, "status", "fresh", "-n", NS, "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["progress"] is None
    assert run(api, "status", "fresh", "-n", NS) == 0
    assert re.search(r"progress\s+- \(no dolly-train.dev/progress annotation yet\)", capsys.readouterr().out)


def test_wait_shows_progress_lines_while_it_waits(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING")] * 3 + [rayjob_status("Complete", "SUCCEEDED")])
    _with_progress(kube, "tiny", SUMMARY)
    original = kube.next_status

    def next_status(ns, name):  # the trainer's annotation advances with each status update
        obj = original(ns, name)
        if obj is not None and obj["status"]["jobStatus"] == "RUNNING":
            cur = json.loads(kube.objects[("rayjobs", ns, name)]["metadata"]["annotations"][progress.ANNOTATION])
            nxt = dict(cur, step=cur["step"] + 10, updated_at=f"2026-11-29T08:4{cur['step'] // 10 % 10}:00Z")
            _with_progress(kube, name, nxt)
            obj["metadata"]["annotations"] = {progress.ANNOTATION: json.dumps(nxt)}
        return obj

    kube.next_status = next_status
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "20") == 0
    out = capsys.readouterr().out
    steps = [int(s.replace(",", "")) for s in re.findall(r"tiny: progress step ([\d,]+)/1,200 \(\d+%\), ETA 42 min, "
                                                         r"loss 1\.21, 8,315 tokens/s", out)]
    assert len(steps) >= 2 and steps == sorted(steps) and len(set(steps)) == len(steps), out
    assert out.rstrip().endswith("tiny: SUCCEEDED")


@pytest.mark.slow
def test_tiny_ray_run_publishes_progress_to_its_rayjob(kube, server, token_file, tmp_path, tiny_model_dir,
                                                       synthetic_data_dir, ray_cluster):
    """`dolly-train train` on the local Ray cluster (2 CPU workers, 6 steps): rank 0, a Ray Train worker process,
    patches the RayJob named by DOLLY_RAYJOB_NAME at each logging interval and checkpoint."""
    from test_train import train

    put_rayjob(kube, "tiny-run", [rayjob_status("Running", "RUNNING")])
    env = {**ray_cluster, progress.ENV_NAME: "tiny-run", progress.ENV_NAMESPACE: NS, progress.ENV_API: server,
           progress.ENV_TOKEN_FILE: str(token_file)}
    proc = train(tmp_path, tiny_model_dir, synthetic_data_dir, "progress", "schedule.max_steps=6", env=env)
    assert "cannot publish progress" not in proc.stdout + proc.stderr
    assert "Ray metrics:" not in proc.stdout + proc.stderr  # the dolly_train_* gauges were created and set
    sent = [json.loads(r["body"]["metadata"]["annotations"][progress.ANNOTATION]) for r in patches(kube)]
    # logging every 3 steps, checkpoint at 6: at least one update mid-run and the final one (older pending
    # summaries may be replaced by newer ones before they are sent, never reordered)
    steps = [s["step"] for s in sent]
    assert len(sent) >= 2 and steps == sorted(steps) and steps[0] < 6, steps
    assert {r["content_type"] for r in patches(kube)} == {"application/merge-patch+json"}
    final = annotation(kube, "tiny-run")
    assert set(final) == set(progress.FIELDS)
    assert final["step"] == final["total_steps"] == 6 and final["percent"] == 100.0 and final["eta_seconds"] == 0
    assert final["last_checkpoint"] == "checkpoint_00000006"
    assert final["loss"] > 0 and final["tokens_per_s"] > 0 and final["val_loss"] > 0
    rows = [json.loads(line) for line in (tmp_path / "progress" / "metrics.jsonl").read_text().splitlines()]
    (last_train,) = [r for r in rows if r["kind"] == "train" and r["step"] == 6]
    assert final["loss"] == pytest.approx(last_train["loss"], abs=1e-4)


def test_eta_from_the_first_window_then_from_wall_time():
    """The tracker starts at the first report (the recipe creates it lazily): its first ETA comes from the logging
    window's step time, later ones from wall time per step since then (validation and saves included)."""
    tracker = progress.Tracker(total_steps=100, start_step=10, run="r")
    first = tracker.update("train", {"step": 10, "step_time_s": 2.0, "loss": 1.0, "tokens_per_s": 1.0, "epoch": 0.1})
    assert first["eta_seconds"] == 180
    tracker.start_time -= 30.0  # 30 s of wall time for the next 10 steps
    later = tracker.update("train", {"step": 20, "step_time_s": 2.0, "loss": 1.0, "tokens_per_s": 1.0, "epoch": 0.2})
    assert later["eta_seconds"] == pytest.approx(240, abs=1)
    assert later["percent"] == 20.0
