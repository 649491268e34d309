"""Contract test of the chart with the CPU smoke values: what the pods would run, run here for real.

    render (values-cpu-smoke.yaml, the volume and config mount moved into a tmp dir)
    -> the ConfigMap's files written where the pods mount them
    -> the staging Job's exact command (init-tiny-model + prepare --source synthetic)
    -> a local Ray head (`ray start --head --num-cpus 2`) standing in for the RayCluster, with the token auth the
       RayCluster spec asks for (authOptions: KubeRay injects RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)
    -> a `ray job submit` without the token, refused
    -> the RayJob's exact entrypoint through `ray job submit --address http://127.0.0.1:<dashboard> -- ...`
       with the token (what KubeRay's submitter pod runs)
    -> a checkpoint and an exported model under <mount>/runs/<run>/
    -> the CPU eval Job's exact commands (eval base, eval tuned, compare) -> the report.

Kubernetes itself (scheduling, KubeRay's reconciler, the PVC) is not here; kind-smoke covers it where docker is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from test_chart import REPO, by_kind, containers, helm, render  # noqa: F401 (helm: the fixture)

VENV_BIN = Path(sys.executable).parent
MOUNT_IN_MANIFESTS = "/mnt/dolly"


def _free_port() -> int:
    # Other sessions on this machine may run Ray too: never take the default 6379/8265.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_env(c: dict, configmaps: dict[str, dict] | None = None, mount: str | None = None) -> dict[str, str]:
    """The env a container gets: literal values and ConfigMap keys, with $(VAR) expanded like the kubelet does.
    `mount` moves the volume: values under /mnt/dolly point into the test's directory instead."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            value = e["value"]
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            value = configmaps[ref["name"]]["data"][ref["key"]]
        else:
            continue  # secretKeyRef (the HF token): none in the smoke values
        if mount and (value == MOUNT_IN_MANIFESTS or value.startswith(MOUNT_IN_MANIFESTS + "/")):
            value = mount + value[len(MOUNT_IN_MANIFESTS):]
        env[e["name"]] = expand(value, env)
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def run_logged(cmd: list[str], env: dict, cwd: Path, timeout: int, log: Path) -> None:
    t0 = time.time()
    with log.open("w") as f:
        res = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    print(f"[contract] {time.time() - t0:6.1f}s rc={res.returncode} {shlex.join(cmd)[:160]}", flush=True)
    assert res.returncode == 0, f"{shlex.join(cmd)} failed ({res.returncode}):\n{log.read_text()[-6000:]}"


def base_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"  # `dolly-train`, `dolly-eval`, `ray` as in the images
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    # Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists (any local ray.init() writes
    # one) but not for the `ray job` client. A pod has no such file: its mode is what KubeRay injects (token, with
    # authOptions) or off. `extra` carries the injected RAY_AUTH_MODE/RAY_AUTH_TOKEN when the chart asks for auth.
    if "RAY_AUTH_MODE" not in extra:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN", None)
    return env


def kuberay_auth_env(rayjob: dict, token: str) -> dict[str, str]:
    """The env KubeRay v1.7.0 adds to the head, worker and submitter containers for `authOptions.mode: token`
    (ray-operator/controllers/ray/common/pod.go, SetContainerTokenAuthEnvVars: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN
    from the Secret's auth_token; the Secret, unless authOptions.secretName names one, holds a random token that
    raycluster_controller.go's createAuthSecret generates: 32 random bytes, base64)."""
    auth = rayjob["spec"]["rayClusterSpec"].get("authOptions") or {}
    if auth.get("mode") != "token":
        return {}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on free ports, owned by this test: `ray start --block` runs in the foreground, so stopping it
    stops exactly the processes it started (never `ray stop`, which would stop every Ray on the machine)."""
    # the job agent's HTTP port too: Ray's default, 52365, is taken whenever another Ray runs on the machine (the
    # test session's own cluster, another session's), and jobs then fail with "No available agent to submit job"
    ports = {"gcs": _free_port(), "dashboard": _free_port(), "agent": _free_port()}
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix sockets cap path length

    def start(env: dict) -> str:
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(ports["gcs"]),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
               "--dashboard-agent-listen-port", str(ports["agent"]),
               "--temp-dir", str(temp_dir), "--include-dashboard", "true", "--disable-usage-stats"]
        log = (tmp_path / "ray-head.log").open("w")
        start.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{ports['dashboard']}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert start.proc.poll() is None, (tmp_path / "ray-head.log").read_text()[-4000:]
            # Ready as KubeRay's head readiness probe means it (dashboard and the raylet's dashboard agent up):
            # a trivial job runs. `ray job list` alone answers before the agent that runs jobs is up, and a
            # submit then fails with "No available agent to submit job" on a loaded machine.
            probe = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
                                   env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                return address
            time.sleep(2)
        raise AssertionError("the Ray head (dashboard + job agent) did not come up in 120 s")

    start.proc = None
    yield start
    if start.proc is not None and start.proc.poll() is None:
        # SIGKILL to the `ray start --block` session: the raylet, GCS, dashboard and workers it spawned, all at
        # once. The cluster holds nothing to save once the test is done, and a graceful SIGTERM took 34-39 s
        # here (each Ray process stopped in turn, with waits); nothing is left in /dev/shm either way.
        os.killpg(start.proc.pid, 9)
        start.proc.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_smoke_chart_runs_end_to_end(helm, ray_head, tmp_path):
    mount = tmp_path / "vol"
    config_dir = tmp_path / "etc" / "dolly-train"
    mount.mkdir()
    objs = render(helm, "values-cpu-smoke.yaml", ["--set", f"storage.mountPath={mount}",
                                                  "--set", f"configMountPath={config_dir}"])
    (rayjob,) = by_kind(objs, "RayJob")
    (staging,) = by_kind(objs, "Job")
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]

    # The ConfigMap volume: each key a file at the head's mount of that volume.
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if "train.yaml" in o["data"]]
    (cm_mount,) = [m["mountPath"] for m in head["volumeMounts"] if m["name"] == "train-config"]
    assert cm_mount == str(config_dir)
    config_dir.mkdir(parents=True)
    for name, text in cm["data"].items():
        (config_dir / name).write_text(text)
    run = yaml.safe_load(cm["data"]["train.yaml"])
    run_dir = mount / "runs" / run["checkpoint"]["run_name"]

    # Staging Job: its exact command and env.
    (sc,) = staging["spec"]["template"]["spec"]["containers"]
    run_logged(sc["command"] + sc["args"], base_env(container_env(sc)), tmp_path, 600, tmp_path / "staging.log")
    assert (mount / "models" / "tiny" / "config.json").is_file()
    assert (mount / "data" / "synthetic" / "manifest.json").is_file()
    # Rerunning (helm upgrade re-runs the hook) skips both steps.
    run_logged(sc["command"] + sc["args"], base_env(container_env(sc)), tmp_path, 120, tmp_path / "staging2.log")
    assert "model already at" in (tmp_path / "staging2.log").read_text()

    # The RayCluster's head, with the head container's env plus what KubeRay injects for token auth; then the
    # submitter's `ray job submit -- <entrypoint>`, with the same injected env.
    import base64
    import secrets

    token = base64.b64encode(secrets.token_bytes(32)).decode()
    auth = kuberay_auth_env(rayjob, token)
    assert auth, "the chart's RayJob must turn Ray token auth on (rayAuth.enabled)"
    address = ray_head(base_env({**container_env(head), **auth}))
    # Anyone else (a pod without the token: no env, no ~/.ray/auth_token) is refused by the job API.
    home = tmp_path / "home-without-token"
    home.mkdir()
    intruder = base_env({"HOME": str(home)})
    refused = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--", "echo", "pwned"],
                             env=intruder, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "pwned" not in refused.stdout, refused.stdout + refused.stderr
    assert "Authentication" in refused.stdout + refused.stderr or "Unauthorized" in refused.stdout + refused.stderr
    wrong = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address],
                           env={**intruder, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint == f"dolly-train train --config {config_dir}/train.yaml"
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "dolly-contract",
              "--", *shlex.split(entrypoint)]
    run_logged(submit, base_env(auth), tmp_path, 600, tmp_path / "train.log")
    assert "Job 'dolly-contract' succeeded" in (tmp_path / "train.log").read_text()
    checkpoints = sorted(run_dir.glob("checkpoint_*"))
    assert checkpoints, f"no checkpoint under {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    assert any((c / "progress.json").is_file() for c in checkpoints)
    export = run_dir / "export"
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (export / name).is_file(), name

    # The CPU eval Job: init containers in order, then the main container, each its exact command.
    cm_eval, job = [o for o in yaml.safe_load_all((REPO / "manifests" / "eval-job-cpu.yaml").read_text()) if o]
    assert cm_eval["data"]["RUN_NAME"] == run["checkpoint"]["run_name"]
    for c in containers(job["spec"]["template"]):
        env = container_env(c, {cm_eval["metadata"]["name"]: cm_eval}, mount=str(mount))
        cmd = [expand(a, env) for a in c["command"]]
        # cwd = the repository, as the image's WORKDIR is its copy of it (the --config paths are relative).
        run_logged(cmd, base_env(env), REPO, 600, tmp_path / f"eval-{c['name']}.log")
    tuned = json.loads((run_dir / "eval" / "tuned" / "metrics.json").read_text())
    base = json.loads((run_dir / "eval" / "base" / "metrics.json").read_text())
    assert tuned["model"]["path"] == str(export) and base["model"]["path"] == str(mount / "models" / "tiny")
    assert tuned["num_examples"] == base["num_examples"] > 0
    compare = json.loads((run_dir / "eval" / "compare" / "compare.json").read_text())
    assert compare["kind"] == "dolly-eval/compare"
    rouge_l = compare["overall"]["rougeL"]
    assert rouge_l["n"] == tuned["num_examples"] and rouge_l["delta"] == pytest.approx(rouge_l["tuned"] - rouge_l["base"])
    assert (run_dir / "eval" / "compare" / "compare.md").is_file()
