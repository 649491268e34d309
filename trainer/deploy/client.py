"""The Kubernetes API client for RayJobs (ray.io/v1).

KubeRay's own Python client is not on PyPI, so this speaks to the API server through the `kubernetes` package
(CustomObjectsApi for RayJobs, CoreV1Api for ConfigMaps, pods and logs). Credentials: `--kubeconfig` /
`--context` (else $KUBECONFIG or ~/.kube/config), falling back to the pod's service account in a cluster.
The `kubernetes` package is imported on first use, so `dolly-train --help` does not pay for it.
"""

from __future__ import annotations

import json

from trainer.deploy.state import RayJobState

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
API_VERSION = f"{GROUP}/{VERSION}"
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


class RayJobClient:
    """RayJobs and the objects `submit` creates beside them, in one namespace; every call has a request timeout
    and turns API errors into K8sError."""

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
