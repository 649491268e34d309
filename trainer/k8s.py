"""`dolly-train submit | status | wait | logs | suspend | resume | delete`: RayJobs (ray.io/v1) on Kubernetes.

    helm template dolly-train charts/dolly-train -f my-values.yaml > rendered.yaml
    dolly-train submit --file rendered.yaml -n dolly-train          # the RayJob out of a multi-doc file
    dolly-train submit --config cpu-tiny --image ghcr.io/dolly-train/cpu:0.1.0 --name tiny --pvc dolly-train-data \\
        model.path=/mnt/dolly/models/tiny data.path=/mnt/dolly/data/synthetic checkpoint.storage_path=/mnt/dolly/runs
        # renders charts/dolly-train (`helm template`) with values from the config and flags: the chart's RayJob
    dolly-train status tiny -n dolly-train                         # phase + progress (step, %, ETA, loss, tokens/s)
    dolly-train wait tiny -n dolly-train --timeout 3600             # progress lines while it waits; exit 0 SUCCEEDED, 1 failed, 124 timeout,
                                                                    # 69 cannot reach / authenticate to the API
    dolly-train logs tiny -n dolly-train --follow                   # the submitter pod (`ray job submit` output)
    dolly-train suspend|resume|delete tiny -n dolly-train

KubeRay's own Python client is not on PyPI, so this speaks to the API server through the `kubernetes` package
(CustomObjectsApi for RayJobs, CoreV1Api for ConfigMaps, pods and logs). Credentials: `--kubeconfig` /
`--context` (else $KUBECONFIG or ~/.kube/config), falling back to the pod's service account in a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer import config as config_mod
from trainer import progress as progress_mod
from trainer.config import ConfigError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
API_VERSION = f"{GROUP}/{VERSION}"
RAY_VERSION = "2.60.0"  # the ray[train] pin in pyproject.toml (tests/test_k8s_client.py checks they agree)
CONFIG_MOUNT = "/etc/dolly-train"
# KubeRay rejects longer RayJob names (ValidationFailed): it derives RayCluster and pod names from them.
MAX_NAME = 47
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# `dolly-train wait` exit codes (also in its --help).
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1  # KubeRay reports the RayJob failed
EXIT_TIMEOUT = 124  # like coreutils `timeout`
EXIT_API = 69  # sysexits EX_UNAVAILABLE: no credentials, rejected credentials, API server unreachable, no such RayJob
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 30.0  # seconds for one API call (connect + read); a watch gets its own, bounded by --timeout
TRANSIENT_HTTP = {429, 500, 502, 503, 504}


class K8sError(RuntimeError):
    """A problem the user can fix (bad input, missing object, no credentials); printed without a traceback.
    `transient`: worth retrying (connection refused or dropped, timeouts, 429 and 5xx answers)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class WatchExpired(Exception):
    """The API server no longer has the watched resourceVersion (410 Gone): read the object again."""


# ---- connection ---------------------------------------------------------------------------------------------

def api_client(kubeconfig: str | None = None, context: str | None = None):
    """An ApiClient from the kubeconfig, or from the pod's service account when there is no kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg,
                                persist_config=False)
    except (config.ConfigException, OSError) as e:
        if kubeconfig or context:  # asked for explicitly: falling back would hide the mistake
            raise K8sError(f"kubeconfig {kubeconfig or '(default)'} context {context or '(current)'}: {e}") from e
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException as e2:
            raise K8sError(f"no Kubernetes credentials: no kubeconfig ({e}) and not inside a pod ({e2})") from e2
    # No hidden urllib3 retries (3 by default, each with the full read timeout): a hung call fails after its
    # request timeout, and `wait` decides about retrying within its own deadline.
    cfg.retries = False
    return client.ApiClient(cfg)


@dataclass
class RayJobState:
    """What KubeRay reports about a RayJob, and what it means for a caller waiting on it.

    KubeRay v1.7.0 (ray-operator/controllers/ray/rayjob_controller.go) retries a failed RayJob on a new RayCluster
    while `status.failed` < `spec.backoffLimit` + 1 (checkBackoffLimitAndUpdateStatusIfNeeded): it then writes
    jobDeploymentStatus Retrying with jobStatus still FAILED from the attempt that failed, deletes the cluster and
    starts over (Retrying -> New -> Initializing). So jobStatus FAILED alone is not a verdict; a Failed deployment is.
    """

    name: str
    namespace: str
    job_status: str
    deployment_status: str
    reason: str
    message: str
    cluster: str
    suspend: bool
    failed: int
    start_time: str
    end_time: str
    backoff_limit: int = 0
    succeeded: int = 0

    @classmethod
    def from_object(cls, obj: dict) -> "RayJobState":
        st, meta, spec = obj.get("status") or {}, obj.get("metadata") or {}, obj.get("spec") or {}
        return cls(
            name=meta.get("name", ""), namespace=meta.get("namespace", ""),
            job_status=st.get("jobStatus") or "", deployment_status=st.get("jobDeploymentStatus") or "",
            reason=st.get("reason") or "", message=st.get("message") or "",
            cluster=st.get("rayClusterName") or "", suspend=bool(spec.get("suspend")),
            failed=int(st.get("failed") or 0), start_time=st.get("startTime") or "", end_time=st.get("endTime") or "",
            backoff_limit=int(spec.get("backoffLimit") or 0), succeeded=int(st.get("succeeded") or 0),
        )

    @property
    def attempts(self) -> int:
        """Attempts KubeRay makes in all: the first plus spec.backoffLimit retries."""
        return self.backoff_limit + 1

    @property
    def attempt(self) -> int:
        """The attempt now running (1-based); in Retrying and Failed, `failed` already counts the attempt that just
        failed."""
        return self.failed if self.deployment_status in ("Retrying", "Failed") and self.failed else self.failed + 1

    @property
    def outcome(self) -> str:
        """'succeeded', 'failed' or 'running'. Mirrors the Argo CD health check (manifests/argocd/
        resource_customizations/ray.io/RayJob/health.lua): failed only when KubeRay says the deployment failed,
        or the Ray job failed in the last attempt that backoffLimit allows."""
        dep, job = self.deployment_status, self.job_status
        if dep in ("Failed", "ValidationFailed"):
            return "failed"  # terminal: KubeRay retries before it writes Failed, never after
        if dep == "Retrying":
            return "running"  # jobStatus is the failed attempt's; a new RayCluster is on its way
        if dep == "Complete":
            return "succeeded" if job == "SUCCEEDED" else "failed"
        if job == "FAILED":
            # The submitter has not finished yet (K8sJobMode waits for it); KubeRay retries unless this was the last.
            return "failed" if self.failed >= self.backoff_limit else "running"
        if job == "STOPPED":
            return "failed"  # KubeRay marks a STOPPED job Complete, and never retries a Complete RayJob
        return "running"  # SUCCEEDED waits for the deployment to be marked Complete on the next reconcile

    def attempt_text(self) -> str:
        if self.deployment_status == "Retrying":
            return (f"attempt {self.attempt}/{self.attempts} failed, retrying on a new RayCluster "
                    f"(attempt {self.attempt + 1}/{self.attempts})")
        if self.deployment_status == "Failed":
            return f"after attempt {self.attempt}/{self.attempts}"
        if self.job_status == "FAILED" and self.deployment_status != "Complete":
            if self.outcome == "running":
                return f"attempt {self.attempt}/{self.attempts} failed, KubeRay will retry"
            return f"attempt {self.attempt}/{self.attempts} failed, no retry left"
        return f"attempt {self.attempt}/{self.attempts}"

    def summary(self) -> str:
        text = f"deployment {self.deployment_status or 'New'}, job {self.job_status or '-'}"
        if (self.backoff_limit or self.failed) and self.deployment_status != "ValidationFailed":
            text += f", {self.attempt_text()}"
        if self.suspend:
            text += ", suspended"
        if self.outcome == "failed" and self.deployment_status == "Failed" and self.job_status not in ("", "FAILED"):
            text += f" (KubeRay gave up while the Ray job last reported {self.job_status})"
        if self.reason:
            text += f" [{self.reason}]"
        if self.message:
            text += f": {self.message}"
        return text


class RayJobClient:
    def __init__(self, namespace: str, api=None):
        from kubernetes import client

        self.namespace = namespace
        self.api = api or api_client()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)  # a hung connection never outlasts the caller
        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status == 0 or e.status is None:  # raised by the client itself, e.g. a failed TLS handshake
                raise K8sError(f"{what}: cannot reach the API server at {self.api.configuration.host}: {e.reason}",
                               transient=True) from e
            raise K8sError(f"{what} in namespace {self.namespace}: {_api_reason(e)}",
                           transient=e.status in TRANSIENT_HTTP) from e
        except (HTTPError, OSError) as e:
            raise K8sError(f"{what}: cannot reach the API server at {self.api.configuration.host}: {e}",
                           transient=True) from e

    def get(self, name: str, timeout: float = REQUEST_TIMEOUT) -> dict:
        return self._call(f"RayJob {name}", self.custom.get_namespaced_custom_object,
                          GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=timeout)

    def watch(self, name: str, resource_version: str, seconds: int, timeout: float):
        """RayJob objects as the API server reports changes after `resource_version`, until the server ends the
        watch (after `seconds`), the connection drops (K8sError, transient) or a read waits `timeout` seconds.
        Raises WatchExpired on 410 Gone (the caller reads the object again and watches from there)."""
        resp = self._call(f"watch RayJob {name}", self.custom.list_namespaced_custom_object,
                          GROUP, VERSION, self.namespace, PLURAL, field_selector=f"metadata.name={name}",
                          watch=True, resource_version=resource_version, timeout_seconds=max(1, int(seconds)),
                          allow_watch_bookmarks=False, _preload_content=False,
                          _request_timeout=(min(10.0, timeout), timeout))  # (connect, each read)
        from urllib3.exceptions import HTTPError

        buf = b""
        try:
            for chunk in resp.stream(4096, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchExpired(obj.get("message", "410 Gone"))
                        raise K8sError(f"watch RayJob {name}: {obj.get('reason')} ({obj.get('code')}): "
                                       f"{obj.get('message', '')}", transient=obj.get("code") in TRANSIENT_HTTP)
                    if event.get("type") == "DELETED":
                        raise K8sError(f"RayJob {name} in namespace {self.namespace} was deleted while waiting")
                    yield obj
        except (HTTPError, OSError) as e:
            raise K8sError(f"watch RayJob {name}: connection to {self.api.configuration.host} lost: {e}",
                           transient=True) from e
        finally:
            resp.release_conn()

    def state(self, name: str) -> RayJobState:
        return RayJobState.from_object(self.get(name))

    def create(self, body: dict) -> dict:
        return self._call(f"create RayJob {body['metadata']['name']}", self.custom.create_namespaced_custom_object,
                          GROUP, VERSION, self.namespace, PLURAL, body)

    def set_suspend(self, name: str, suspend: bool) -> dict:
        # A JSON merge patch of one field: KubeRay deletes the RayCluster on true and creates a new one on false.
        return self._call(f"patch RayJob {name}", self.custom.patch_namespaced_custom_object,
                          GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"suspend": suspend}},
                          _content_type=MERGE_PATCH)

    def delete(self, name: str) -> None:
        # Foreground: the call returns once the RayJob is marked for deletion; its RayCluster, submitter Job
        # and (for submit --config) ConfigMap go with it through their ownerReferences.
        self._call(f"delete RayJob {name}", self.custom.delete_namespaced_custom_object,
                   GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground")

    def _typed(self, obj: dict):
        from kubernetes import client

        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "ConfigMap":
            api = self.core
            return (api.create_namespaced_config_map, api.patch_namespaced_config_map,
                    api.delete_namespaced_config_map, f"ConfigMap {name}")
        if kind == "NetworkPolicy":
            api = client.NetworkingV1Api(self.api)
            return (api.create_namespaced_network_policy, api.patch_namespaced_network_policy,
                    api.delete_namespaced_network_policy, f"NetworkPolicy {name}")
        raise K8sError(f"{kind}/{name}: submit cannot create this kind")

    def create_object(self, obj: dict) -> dict:
        create, _, _, what = self._typed(obj)
        return self._call(f"create {what}", create, self.namespace, obj)

    def delete_object(self, obj: dict) -> None:
        _, _, delete, what = self._typed(obj)
        self._call(f"delete {what}", delete, obj["metadata"]["name"], self.namespace)

    def own(self, obj: dict, rayjob: dict) -> None:
        """Make the RayJob the owner of `obj`, so deleting the RayJob deletes it too."""
        owner = {"apiVersion": API_VERSION, "kind": "RayJob", "name": rayjob["metadata"]["name"],
                 "uid": rayjob["metadata"]["uid"], "blockOwnerDeletion": False}
        _, patch, _, what = self._typed(obj)
        # Explicit content type: for built-in objects the client defaults to JSON Patch, which needs a list body.
        self._call(f"patch {what}", patch, obj["metadata"]["name"], self.namespace,
                   {"metadata": {"ownerReferences": [owner]}}, _content_type=MERGE_PATCH)

    def submitter_pods(self, name: str) -> list:
        """Pods of the submitter Kubernetes Job, which KubeRay names after the RayJob; newest last."""
        pods = self._call(f"list pods of job {name}", self.core.list_namespaced_pod,
                          self.namespace, label_selector=f"job-name={name}")
        return sorted(pods.items, key=lambda p: (p.metadata.creation_timestamp, p.metadata.name))

    def pod_log(self, pod: str, follow: bool):
        """The pod's log: a str, or with follow an iterator of byte chunks as the pod writes them."""
        if not follow:
            return self._call(f"logs of pod {pod}", self.core.read_namespaced_pod_log, pod, self.namespace)
        resp = self._call(f"logs of pod {pod}", self.core.read_namespaced_pod_log, pod, self.namespace,
                          follow=True, _preload_content=False)
        return resp.stream(4096, decode_content=True)


def _api_reason(e) -> str:
    try:
        body = json.loads(e.body)
        return f"{body.get('reason') or e.reason} ({e.status}): {body.get('message', '')}".rstrip(": ")
    except (TypeError, ValueError):
        return f"{e.reason} ({e.status})"


# ---- building RayJobs ---------------------------------------------------------------------------------------

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


CHART = Path(__file__).resolve().parents[1] / "charts" / "dolly-train"
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


# ---- commands -----------------------------------------------------------------------------------------------

def _client(args) -> RayJobClient:
    return RayJobClient(args.namespace, api_client(args.kubeconfig, args.context))


def cmd_submit(args) -> int:
    if bool(args.file) == bool(args.config):
        raise K8sError("submit: give either --file (a RayJob YAML) or --config with --image")
    if args.file:
        body, others = rayjob_from_file(Path(args.file), args.name)
        if args.overrides:
            raise K8sError(f"submit --file: key=value overrides ({args.overrides[0]}) only apply to --config")
        if others:
            print(f"note: submitting only the RayJob; not applied: {', '.join(others)}", file=sys.stderr)
        body.setdefault("metadata", {}).pop("namespace", None)  # --namespace decides
        return _print_created(_client(args).create(body))
    if not args.image or not args.name:
        raise K8sError("submit --config: --image and --name are required")
    name = check_name(args.name)
    cfg = config_mod.load(args.config, args.overrides)
    check_pod_paths(cfg)
    if not args.pvc:
        raise K8sError("submit --config: --pvc is required: the chart mounts a shared PersistentVolumeClaim at "
                       "--mount-path in every pod (e.g. the chart's <release>-data, or manifests/argocd/storage/pvc.yaml)")
    values = chart_values(name, cfg, args.image, pvc=args.pvc, mount_path=args.mount_path,
                          worker_memory=args.worker_memory)
    rayjob, others = submit_objects(render_chart(name, args.namespace, values, args.values or [], Path(args.chart)),
                                    Path(args.chart))
    if args.dry_run:
        yaml.dump_all([*others, rayjob], sys.stdout, Dumper=_ManifestDumper, sort_keys=False)
        return 0
    client = _client(args)
    created_others = []
    try:
        for obj in others:
            client.create_object(obj)
            created_others.append(obj)
        created = client.create(rayjob)
    except K8sError:
        for obj in reversed(created_others):  # nothing owns them yet: do not leave them behind
            client.delete_object(obj)
        raise
    for obj in others:
        client.own(obj, created)
    return _print_created(created)


def _print_created(obj: dict) -> int:
    meta = obj["metadata"]
    print(f"rayjob.ray.io/{meta['name']} created in namespace {meta.get('namespace', '?')}")
    return 0


def cmd_status(args) -> int:
    client = _client(args)
    obj = client.get(args.name)
    s = RayJobState.from_object(obj)
    prog = progress_mod.from_object(obj)
    age = progress_mod.age_seconds(prog) if prog else None
    if args.output == "json":
        # KubeRay's status as it is, plus the outcome and the trainer's progress annotation (null when absent).
        out = {**(obj.get("status") or {}), "outcome": s.outcome,
               "progress": {**prog, "age_seconds": None if age is None else round(age)} if prog else None}
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    rows = [("rayjob", f"{args.namespace}/{s.name}"), ("job status", s.job_status or "-"),
            ("deployment", s.deployment_status or "New"), ("reason", s.reason or "-"),
            ("message", s.message or "-"), ("ray cluster", s.cluster or "-"), ("suspend", str(s.suspend).lower()),
            ("failed attempts", str(s.failed)), ("started", s.start_time or "-"), ("ended", s.end_time or "-"),
            ("outcome", s.outcome)]
    rows += _progress_rows(prog, age)
    for key, value in rows:
        print(f"{key:<16} {value}")
    return 0


def _progress_rows(prog: dict | None, age: float | None) -> list[tuple[str, str]]:
    """Table rows of the trainer's progress annotation (trainer/progress.py)."""
    if not prog:
        return [("progress", f"- (no {progress_mod.ANNOTATION} annotation yet)")]

    def fmt(key, spec):
        v = prog.get(key)
        return "-" if v is None else format(v, spec)

    step, total = prog.get("step"), prog.get("total_steps")
    pct = prog.get("percent")
    return [("step", f"{step if step is not None else '-'}/{total if total is not None else '-'}"
                     + (f" ({pct:.1f}%)" if pct is not None else "")),
            ("epoch", fmt("epoch", ".2f")),
            ("eta", progress_mod.duration(prog.get("eta_seconds"))),
            ("loss", fmt("loss", ".4f")), ("val loss", fmt("val_loss", ".4f")),
            ("tokens/s", fmt("tokens_per_s", ",.0f")),
            ("last checkpoint", prog.get("last_checkpoint") or "-"),
            ("updated", f"{progress_mod.duration(age)} ago ({prog.get('updated_at')})" if age is not None else "-")]


def wait_for(client: RayJobClient, name: str, timeout: float, poll: float, out=None) -> int:
    """Follow the RayJob until it succeeds (0) or fails (1), or `timeout` seconds pass (124); exit 69 when the API
    server cannot be reached (retried with backoff until the deadline) or refuses the credentials or the name.

    Each round reads the object (GET) and then watches it from that resourceVersion; a watch that ends, drops its
    connection or expires (410) is resumed by the next round, so no change is missed and none is waited for
    longer than `poll` seconds past a quiet watch. Every call carries a request timeout bounded by the deadline."""
    out = out or sys.stdout
    start = time.monotonic()
    deadline = start + timeout
    last, state, api_error, delay = None, None, None, min(max(poll, 0.05), 1.0)
    last_progress = None

    def report(obj: dict) -> int | None:
        nonlocal last, state, last_progress
        state = RayJobState.from_object(obj)
        if state.summary() != last:
            last = state.summary()
            print(f"[{time.monotonic() - start:7.1f}s] {name}: {last}", file=out, flush=True)
        prog = progress_mod.from_object(obj)
        if prog and prog.get("updated_at") != last_progress:  # the trainer's annotation (trainer/progress.py)
            last_progress = prog.get("updated_at")
            print(f"[{time.monotonic() - start:7.1f}s] {name}: progress {progress_mod.line(prog)}", file=out, flush=True)
        if state.outcome == "succeeded":
            print(f"{name}: SUCCEEDED", file=out, flush=True)
            return EXIT_SUCCEEDED
        if state.outcome == "failed":
            print(f"{name}: FAILED - {state.summary()}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        return None

    while True:
        remaining, in_watch = deadline - time.monotonic(), False
        try:
            obj = client.get(name, timeout=min(REQUEST_TIMEOUT, max(remaining, 0.1)))
            api_error, delay = None, min(max(poll, 0.05), 1.0)
            verdict = report(obj)
            if verdict is not None:
                return verdict
            rv = (obj.get("metadata") or {}).get("resourceVersion") or "0"
            remaining = deadline - time.monotonic()
            if remaining > 0:
                in_watch = True
                for obj in client.watch(name, rv, seconds=min(max(poll, 1.0), remaining + 1),
                                        timeout=min(max(poll, 1.0) + 5.0, remaining + 1.0)):
                    verdict = report(obj)
                    if verdict is not None:
                        return verdict
                    if time.monotonic() >= deadline:
                        break
        except WatchExpired:
            continue  # read the object again, watch from its new resourceVersion
        except K8sError as e:
            if not e.transient:
                print(f"dolly-train wait: {e}", file=sys.stderr, flush=True)
                return EXIT_API
            if not (in_watch and time.monotonic() >= deadline):  # a watch read cut short by our own deadline is no error
                api_error = e
                pause = min(delay, max(deadline - time.monotonic(), 0))
                print(f"[{time.monotonic() - start:7.1f}s] {name}: API error, retrying in {pause:.1f} s: {e}",
                      file=sys.stderr, flush=True)
                time.sleep(pause)
                delay = min(delay * 2, 30.0)
        if time.monotonic() >= deadline:
            if api_error is not None:
                print(f"{name}: cannot reach the API server for {timeout:g} s; last error: {api_error}",
                      file=sys.stderr, flush=True)
                return EXIT_API
            print(f"{name}: timed out after {timeout:g} s ({state.summary() if state else 'no status'})",
                  file=sys.stderr, flush=True)
            return EXIT_TIMEOUT


def cmd_wait(args) -> int:
    try:
        client = _client(args)
    except K8sError as e:  # no or unreadable credentials: not a verdict about the job
        print(f"dolly-train wait: {e}", file=sys.stderr)
        return EXIT_API
    return wait_for(client, args.name, args.timeout, args.poll)


def cmd_logs(args) -> int:
    client = _client(args)
    pods = client.submitter_pods(args.name)
    if not pods:
        state = client.state(args.name)  # also says "not found" when the RayJob itself is missing
        raise K8sError(f"RayJob {args.name} has no submitter pod yet (label job-name={args.name} in namespace "
                       f"{args.namespace}; {state.summary()})")
    for pod in pods if args.all else pods[-1:]:
        if args.all:
            print(f"==> pod {pod.metadata.name}", flush=True)
        log = client.pod_log(pod.metadata.name, args.follow and pod is pods[-1])
        if isinstance(log, str):
            sys.stdout.write(log)
        else:
            for chunk in log:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        sys.stdout.flush()
    return 0


def cmd_suspend(args) -> int:
    suspend = args.command == "suspend"
    obj = _client(args).set_suspend(args.name, suspend)
    print(f"rayjob.ray.io/{args.name} {'suspended' if suspend else 'resumed'} "
          f"(spec.suspend={str(bool(obj.get('spec', {}).get('suspend'))).lower()})")
    return 0


def cmd_delete(args) -> int:
    _client(args).delete(args.name)
    print(f"rayjob.ray.io/{args.name} deleted from namespace {args.namespace}")
    return 0


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except (K8sError, ConfigError) as e:
            print(f"dolly-train {args.command}: {e}", file=sys.stderr)
            return 1 if isinstance(e, K8sError) else 2
    return run


# ---- argparse -----------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, name: bool = True) -> None:
    if name:
        p.add_argument("name", help="RayJob name")
    p.add_argument("-n", "--namespace", default="default", help="namespace of the RayJob (default: %(default)s)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else in-cluster)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")


def add_parser(sub) -> None:
    fmt = argparse.HelpFormatter
    p = sub.add_parser("submit", formatter_class=fmt, help="create a RayJob from a YAML file or a train config",
                       description="Create a RayJob: the RayJob in --file (e.g. `helm template` output), or the "
                                   "chart's RayJob for a train config (--config, a file or preset) and --image: "
                                   "`helm template` of --chart with values from the config and the flags (then "
                                   "--values files), creating the RayJob and the ConfigMap (train.yaml) and "
                                   "NetworkPolicy it renders, both owned by the RayJob.")
    _common(p, name=False)
    p.add_argument("--file", help="YAML file holding a ray.io/v1 RayJob (other documents are skipped)")
    p.add_argument("--config", help="train config file or preset (trainer/config.py schema)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
    p.add_argument("--image", help="image for head and workers (with --config)")
    p.add_argument("--name", help="RayJob name (required with --config; picks one RayJob from --file)")
    p.add_argument("--pvc", help="existing PersistentVolumeClaim mounted at --mount-path in every pod (with --config)")
    p.add_argument("--values", action="append", metavar="FILE",
                   help="chart values file applied on top of the flags (repeatable; with --config), e.g. "
                        "charts/dolly-train/values-gpu-8x.yaml without its train section")
    p.add_argument("--chart", default=str(CHART), help="the dolly-train chart (default: %(default)s)")
    p.add_argument("--mount-path", default="/mnt/dolly", help="where --pvc is mounted (default: %(default)s)")
    p.add_argument("--worker-memory", default="8Gi", help="memory request and limit per worker pod (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the objects instead of creating them")
    p.set_defaults(func=_guard(cmd_submit))

    p = sub.add_parser("status", formatter_class=fmt, help="show a RayJob's status and training progress",
                       description="Print jobStatus, jobDeploymentStatus, reason and message of a RayJob, and the "
                                   "training progress rank 0 publishes in its dolly-train.dev/progress annotation "
                                   "(step, %, ETA, loss, tokens/s, last checkpoint, age of the update). "
                                   "--output json: the status fields, `outcome` and `progress` (null when absent).")
    _common(p)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format (default: %(default)s)")
    p.set_defaults(func=_guard(cmd_status))

    p = sub.add_parser("wait", formatter_class=argparse.RawDescriptionHelpFormatter, help="wait for a RayJob to finish",
                       description="Wait for a RayJob, following it with a watch (resumed after a dropped connection) "
                                   "and retrying transient API errors with backoff; prints a line per status change and "
                                   "per update of the trainer's progress annotation (step, %, ETA, loss, tokens/s).\n"
                                   "A retry (jobDeploymentStatus Retrying, within spec.backoffLimit) is not a failure.",
                       epilog="exit status:\n"
                              f"  {EXIT_SUCCEEDED:<4} the Ray job SUCCEEDED and KubeRay marked the RayJob Complete\n"
                              f"  {EXIT_FAILED:<4} the RayJob failed: deployment Failed or ValidationFailed, Complete "
                              "without SUCCEEDED,\n       or the Ray job FAILED in its last attempt\n"
                              f"  {EXIT_TIMEOUT:<4} --timeout passed while the RayJob was still running\n"
                              f"  {EXIT_API:<4} cannot reach or authenticate to the API server (no or rejected "
                              "credentials,\n       unreachable for the whole --timeout), or no such RayJob\n"
                              "  2    bad arguments")
    _common(p)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait (default: %(default)s)")
    p.add_argument("--poll", type=float, default=10.0,
                   help="longest quiet watch before the status is read again (default: %(default)s)")
    p.set_defaults(func=_guard(cmd_wait))

    p = sub.add_parser("logs", formatter_class=fmt, help="print the submitter pod's logs",
                       description="Print the logs of the RayJob's submitter pod (the Kubernetes Job KubeRay "
                                   "names after the RayJob; label job-name), which follows the Ray job's output.")
    _common(p)
    p.add_argument("-f", "--follow", action="store_true", help="stream the newest pod's log until it ends")
    p.add_argument("--all", action="store_true", help="every submitter pod (retries), oldest first")
    p.set_defaults(func=_guard(cmd_logs))

    for verb, text in (("suspend", "suspend a RayJob (KubeRay deletes its RayCluster)"),
                       ("resume", "resume a suspended RayJob (KubeRay creates a new RayCluster)")):
        p = sub.add_parser(verb, formatter_class=fmt, help=text, description=text + " by patching spec.suspend.")
        _common(p)
        p.set_defaults(func=_guard(cmd_suspend))

    p = sub.add_parser("delete", formatter_class=fmt, help="delete a RayJob with its cluster and submitter",
                       description="Delete a RayJob (foreground propagation: its RayCluster, submitter Job and "
                                   "ConfigMap go with it).")
    _common(p)
    p.set_defaults(func=_guard(cmd_delete))
