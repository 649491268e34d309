"""Building a RayJob for `dolly-train submit`: the RayJob out of a YAML file (e.g. `helm template` output), or
`helm template` of charts/dolly-train with values from a train config and the command's flags."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from trainer import config as config_mod
from trainer.deploy.client import API_VERSION, K8sError

RAY_VERSION = "2.60.0"  # the ray[train] pin in pyproject.toml (tests/test_k8s_client.py checks they agree)
CONFIG_MOUNT = "/etc/dolly-train"
# KubeRay rejects longer RayJob names (ValidationFailed): it derives RayCluster and pod names from them.
MAX_NAME = 47
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def check_name(name: str) -> str:
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise K8sError(f"--name {name!r}: a RayJob name must be 1-{MAX_NAME} lowercase letters, digits or '-', "
                       "starting with a letter and ending with a letter or digit")
    return name


def check_pod_paths(cfg: config_mod.TrainConfig) -> None:
    """Relative paths would resolve in the head pod's working directory, not on the shared volume."""
    paths = {"data.path": cfg.data.path}
    if not cfg.is_remote_storage:
        paths["checkpoint.storage_path"] = cfg.checkpoint.storage_path
    for key, value in paths.items():
        if not value.startswith("/"):
            raise K8sError(f"{key}: {value!r} must be an absolute path inside the pods (e.g. under --mount-path); "
                           f"override it, e.g. {key}=/mnt/dolly/...")


def rayjob_from_file(path: Path, name: str | None = None) -> tuple[dict, list[str]]:
    """The RayJob in a (multi-document) YAML file, e.g. `helm template` output, and the other objects' names."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as e:
        raise K8sError(f"--file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise K8sError(f"--file {path}: not valid YAML: {e}") from e
    jobs, others = [], []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise K8sError(f"--file {path}: document {i + 1} is a {type(doc).__name__}, not a Kubernetes object")
        ident = f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
        is_job = doc.get("kind") == "RayJob" and doc.get("apiVersion") == API_VERSION
        (jobs if is_job else others).append(doc if is_job else ident)
    if name:
        jobs = [j for j in jobs if (j.get("metadata") or {}).get("name") == name]
    if not jobs:
        raise K8sError(f"--file {path}: no {API_VERSION} RayJob{f' named {name}' if name else ''} among "
                       f"{len(docs)} documents ({', '.join(others) or 'none'})")
    if len(jobs) > 1:
        names = ", ".join(j["metadata"].get("name", "?") for j in jobs)
        raise K8sError(f"--file {path}: {len(jobs)} RayJobs ({names}); pick one with --name")
    job = jobs[0]
    if not (job.get("metadata") or {}).get("name"):
        raise K8sError(f"--file {path}: the RayJob has no metadata.name")
    if not isinstance(job.get("spec"), dict) or not (job["spec"].get("entrypoint") or job["spec"].get("rayClusterSpec")):
        raise K8sError(f"--file {path}: RayJob {job['metadata']['name']} has no spec.entrypoint or spec.rayClusterSpec")
    return job, others


CHART = Path(__file__).resolve().parents[2] / "charts" / "dolly-train"
# Objects `submit --config` creates from the rendered chart, beside the RayJob (which then owns them).
SUBMIT_KINDS = ("ConfigMap", "NetworkPolicy")


def helm_binary() -> str:
    """helm: $DOLLY_TRAIN_HELM, else PATH, else the checkout's .tools/bin (`make tools`)."""
    local = CHART.parents[1] / ".tools" / "bin" / "helm"
    for candidate in (os.environ.get("DOLLY_TRAIN_HELM"), shutil.which("helm"), str(local)):
        if candidate and Path(candidate).is_file():
            return candidate
    raise K8sError("submit --config renders the chart with `helm template`, but no helm binary was found: install "
                   "Helm 3.8+ (or run `make tools`), or point $DOLLY_TRAIN_HELM at one")


def split_image(image: str) -> tuple[str, str]:
    """'registry:5000/org/img:tag' -> ('registry:5000/org/img', 'tag'); no tag -> the chart's appVersion."""
    if "@" in image:
        raise K8sError(f"--image {image!r}: give a tag, not a digest (the chart writes <repository>:<tag>)")
    repo, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return repo, tag


def chart_values(name: str, cfg: config_mod.TrainConfig, image: str, *, pvc: str, mount_path: str = "/mnt/dolly",
                 head_cpu: str = "1", head_memory: str = "4Gi", worker_memory: str = "8Gi",
                 worker_shm: str = "2Gi") -> dict:
    """The chart values that say what `submit --config` asks for: one worker pod per Ray Train worker (one GPU
    each when use_gpu), the model and data already on the claim (no staging Job), train.yaml from the config."""
    repo, tag = split_image(image)
    s = cfg.scaling
    worker_res = {"cpu": str(s.cpus_per_worker + 1), "memory": worker_memory}  # +1 CPU for the raylet and loaders
    head_res = {"cpu": head_cpu, "memory": head_memory}
    return {
        "fullnameOverride": name,
        "image": {"repository": repo, "tag": tag},
        "serviceAccount": {"create": False},
        # No Role/RoleBinding from submit (it creates only SUBMIT_KINDS): the progress annotation needs the chart's
        # RBAC and service account, so `helm install` the chart for it (docs/chart.md, "Watching a run").
        "progress": {"enabled": False},
        "storage": {"mountPath": mount_path, "existingClaim": pvc},
        "configMountPath": CONFIG_MOUNT,
        "staging": {"enabled": False},
        "head": {"resources": {"requests": head_res, "limits": dict(head_res)}, "shmSize": "1Gi"},
        "worker": {"groupName": "gpu" if s.use_gpu else "cpu", "replicas": s.num_workers,
                   "gpusPerPod": int(s.use_gpu), "resources": {"requests": worker_res, "limits": dict(worker_res)},
                   "shmSize": worker_shm},
        "train": cfg.to_dict(),
    }


def render_chart(name: str, namespace: str, values: dict, values_files: list[str] = (), chart: Path = CHART) -> list[dict]:
    """`helm template` of the chart with `values`, then the user's values files on top (they win over the flags;
    `train` comes only from --config). Returns the rendered objects."""
    if not (Path(chart) / "Chart.yaml").is_file():
        raise K8sError(f"--chart {chart}: no Helm chart there (Chart.yaml missing)")
    for vf in values_files:
        try:
            user = yaml.safe_load(Path(vf).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise K8sError(f"--values {vf}: {e}") from e
        if isinstance(user, dict) and "train" in user:
            raise K8sError(f"--values {vf}: sets `train`, but with submit --config the training config comes from "
                           "--config and its key=value overrides")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="dolly-submit-") as f:
        yaml.safe_dump(values, f, sort_keys=False)
        f.flush()
        cmd = [helm_binary(), "template", name, str(chart), "--namespace", namespace, "-f", f.name]
        for vf in values_files:
            cmd += ["-f", str(vf)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise K8sError(f"helm template {chart} failed:\n{res.stderr.strip()}")
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def submit_objects(objs: list[dict], chart: Path = CHART) -> tuple[dict, list[dict]]:
    """The RayJob and the objects it needs (train.yaml ConfigMap, NetworkPolicy) out of a chart render."""
    jobs = [o for o in objs if o.get("kind") == "RayJob"]
    if len(jobs) != 1:
        raise K8sError(f"the chart at {chart} rendered {len(jobs)} RayJobs (mode must be rayjob)")
    others = [o for o in objs if o.get("kind") != "RayJob"]
    extra = [f"{o['kind']}/{o['metadata']['name']}" for o in others if o.get("kind") not in SUBMIT_KINDS]
    if extra:
        raise K8sError(f"submit --config creates {', '.join(SUBMIT_KINDS)} and the RayJob, but the values also "
                       f"render {', '.join(extra)}: use `helm install` for those (or turn them off in --values)")
    for o in others:
        o["metadata"].pop("namespace", None)
    return jobs[0], others


class _ManifestDumper(yaml.SafeDumper):
    """kubectl-like YAML: multi-line strings (train.yaml) as `|` blocks, shared dicts repeated, not aliased."""

    def ignore_aliases(self, data):
        return True


_ManifestDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump_manifests(objs: list[dict], stream) -> None:
    """`submit --dry-run`: the objects as kubectl-like multi-document YAML."""
    yaml.dump_all(objs, stream, Dumper=_ManifestDumper, sort_keys=False)
