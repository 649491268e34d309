"""Secrets never travel in Ray's runtime env (the dashboard, `ray list actors --detail` and the GCS show its env
vars to anyone who reaches the cluster): the `TorchTrainer` that `dolly-train train` builds is inspected as built,
and the chart's RayJob is rendered and read. Workers get secrets from their pod's env (secretKeyRef / envFrom)
or a file whose path may travel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer import config as C
from trainer.launch import make_trainer

# The test's own idea of a secret-looking name, written independently of trainer.launch.SECRET_ENV.
SECRET_LOOKING = re.compile(r"TOKEN(_|$)|SECRET|PASSWORD|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIALS$", re.I)
SECRETS = {name: f"sentinel-secret-{i:02d}-value" for i, name in enumerate([
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN", "DOLLY_WANDB_API_KEY", "DOLLY_DB_PASSWORD", "TORCH_EXTENSIONS_AUTH_TOKEN",
    "GOOGLE_OAUTH_ACCESS_TOKEN", "DS_PRIVATE_KEY", "NCCL_SECRET"])}
NEEDED = {  # what workers do need, and may see: offline mode, hooks, the object-store endpoint, file pointers
    "HF_HUB_OFFLINE": "1", "HF_HOME": "/cache/hf", "TOKENIZERS_PARALLELISM": "false", "DOLLY_TEST_X": "1",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "us-east-1",
    "AWS_SHARED_CREDENTIALS_FILE": "/var/run/secrets/aws/credentials",
    "GOOGLE_APPLICATION_CREDENTIALS": "/var/run/secrets/gcp/key.json", "HF_TOKEN_PATH": "/var/run/secrets/hf/token",
    # the progress publisher's token file (trainer/progress.py): rank 0 needs the path to patch its RayJob
    "DOLLY_KUBE_TOKEN_FILE": "/var/run/secrets/kubernetes.io/serviceaccount/token",
}


def test_no_secret_reaches_the_runtime_env(monkeypatch, tmp_path):
    for k, v in {**SECRETS, **NEEDED}.items():
        monkeypatch.setenv(k, v)
    cfg = C.load("cpu-tiny", [f"checkpoint.storage_path={tmp_path}"])
    trainer = make_trainer(cfg)
    run_config = trainer.run_config
    env = run_config.worker_runtime_env["env_vars"]
    leaked = {k for k in env if SECRET_LOOKING.search(k) and k not in NEEDED}
    assert not leaked, leaked
    assert not (set(env.values()) & set(SECRETS.values()))  # nor a secret's value under another name
    for k, v in NEEDED.items():
        assert env.get(k) == v, k
    # nothing else the trainer carries to the controller or the workers holds a secret either
    blob = repr(trainer.train_loop_config) + repr(run_config)
    assert not [v for v in SECRETS.values() if v in blob]


def _env_entries(obj) -> list[dict]:
    """Every `env:` entry of every container anywhere in a rendered object."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "env" and isinstance(v, list):
                found += [e for e in v if isinstance(e, dict)]
            else:
                found += _env_entries(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _env_entries(v)
    return found


@pytest.mark.parametrize("args", [[], ["-f", "values-gpu-8x.yaml"],
                                  ["--set", "staging.hfTokenSecret.name=hf-token",
                                   "--set", "storage.objectStore.credentialsSecret=s3-creds"]])
def test_chart_passes_secrets_only_through_the_pod_env(args):
    """The chart's RayJob has no runtimeEnvYAML (KubeRay would hand it to `ray job submit --runtime-env-json`,
    and the dashboard shows it), and no container anywhere gets a secret-looking variable as a literal value:
    only `valueFrom.secretKeyRef` or `envFrom` a Secret."""
    import subprocess

    import yaml

    import k8s_validate as kv

    chart = Path(__file__).resolve().parents[1] / "charts" / "dolly-train"
    args = [a if not a.endswith(".yaml") else str(chart / a) for a in args]
    res = subprocess.run([kv.tool("helm"), "template", "dolly-train", str(chart), *args], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    objs = [o for o in yaml.safe_load_all(res.stdout) if o]
    jobs = [o for o in objs if o["kind"] == "RayJob"]
    assert jobs and all("runtimeEnvYAML" not in j["spec"] for j in jobs)
    entries = [e for o in objs for e in _env_entries(o)]
    assert entries
    # A file pointer of NEEDED (HF_TOKEN_PATH: the staging Job's mounted token file) may be a literal: its value is
    # an absolute path, never the secret.
    literal = [e["name"] for e in entries if SECRET_LOOKING.search(e["name"]) and "value" in e
               and not (e["name"] in NEEDED and e["value"].startswith("/"))]
    assert not literal, literal
    if "staging.hfTokenSecret.name=hf-token" in args:
        # The HF token is not in any env at all: the staging pod mounts the Secret as a file and huggingface_hub
        # reads it through HF_TOKEN_PATH (the checkov hardening; tests/test_chart.py checks the mount).
        assert not [e for e in entries if e["name"] == "HF_TOKEN"]
        (staging,) = [o for o in objs if o["kind"] == "Job" and any(
            e["name"] == "HF_TOKEN_PATH" for c in o["spec"]["template"]["spec"]["containers"] for e in c.get("env", []))]
        pod = staging["spec"]["template"]["spec"]
        (path,) = [e["value"] for c in pod["containers"] for e in c["env"] if e["name"] == "HF_TOKEN_PATH"]
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        secret_vols = [v["name"] for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "hf-token"]
        assert any(path.startswith(mounts[v] + "/") for v in secret_vols), (path, mounts, secret_vols)
