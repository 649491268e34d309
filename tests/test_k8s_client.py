"""`dolly-train submit|status|wait|logs|suspend|resume|delete` (trainer/deploy/) against a local API server.

The server is http.server on 127.0.0.1 (a random port) answering the Kubernetes API paths the client uses, the
way the API server does: bearer-token auth, 404/409 Status objects, patch content types checked (merge patch on
custom resources; JSON Patch bodies must be lists), RayJob status moving through KubeRay's states per read and
per watch event (a chunked watch stream ending after timeoutSeconds, 410 Gone as an ERROR event), scripted
faults (5xx answers, a dropped watch connection, a request that hangs), pod lists filtered by label selector,
pod logs (streamed with follow). The real `kubernetes` client talks to it over
HTTP through a kubeconfig file, and over HTTPS with a service-account token for the in-cluster path.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

pytest.importorskip("kubernetes", reason="the k8s extra provides the kubernetes client")

from trainer import cli  # noqa: E402
from trainer.deploy import cli as k8s_cli, rayjob  # noqa: E402
from trainer import config as config_mod  # noqa: E402

TOKEN = "test-token-1f2e3d"
NS = "dolly-train"


# ---- the API server ---------------------------------------------------------------------------------------------

def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _merge(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeKube:
    """State of the fake cluster, and what the client asked it."""

    def __init__(self):
        self.objects: dict[tuple, dict] = {}      # (resource, namespace, name) -> object
        self.statuses: dict[tuple, list] = {}     # (namespace, rayjob) -> pending statuses, one per read/event
        # (namespace, rayjob) -> what another controller changes with each of those statuses (Kueue flips
        # spec.suspend): {"suspend": bool, "generation": int} or None, aligned with `statuses`
        self.spec_changes: dict[tuple, list] = {}
        self.logs: dict[tuple, list[str]] = {}    # (namespace, pod) -> log lines
        self.requests: list[dict] = []
        # Faults for the next RayJob reads and watches, in order: an HTTP status (int), "drop" (a watch stream
        # cut after its first event, without the closing chunk), "gone" (a watch answering 410 as an ERROR
        # event), "hang" (no answer for `hang_seconds`).
        self.faults: list = []
        self.hang_seconds = 5.0
        self.resource_version = 100
        self.lock = threading.Lock()

    def add_pod(self, ns: str, name: str, job: str, created: str, lines: list[str]):
        self.objects[("pods", ns, name)] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": created,
                         "labels": {"job-name": job, "batch.kubernetes.io/job-name": job}},
            "spec": {"containers": [{"name": "ray-job-submitter", "image": "ghcr.io/dolly-train/trainer:0.1.0"}],
                     "restartPolicy": "Never"},
            "status": {"phase": "Running"},
        }
        self.logs[(ns, name)] = lines

    def next_status(self, ns: str, name: str) -> dict | None:
        """Apply the next pending status to the RayJob (as a KubeRay status update would); None when none is left."""
        queue = self.statuses.get((ns, name))
        if not queue:
            return None
        obj = self.objects[("rayjobs", ns, name)]
        obj["status"] = queue.pop(0)
        changes = self.spec_changes.get((ns, name))
        change = changes.pop(0) if changes else None
        if change:
            obj["spec"]["suspend"] = change["suspend"]
            obj["metadata"]["generation"] = change["generation"]
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)
        return copy.deepcopy(obj)

    def handle(self, method: str, url: str, headers, body: bytes):
        parsed = urlparse(url)
        query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
        data = json.loads(body) if body else None
        self.requests.append({"method": method, "path": parsed.path, "query": query, "body": data,
                              "content_type": headers.get("Content-Type")})
        scheme, _, token = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or token != TOKEN:  # auth schemes are case-insensitive (RFC 7235)
            return 401, _status(401, "Unauthorized", "Unauthorized")
        routes = [
            (r"/apis/ray\.io/v1/namespaces/([^/]+)/rayjobs(?:/([^/]+))?", "rayjobs"),
            (r"/api/v1/namespaces/([^/]+)/configmaps(?:/([^/]+))?", "configmaps"),
            (r"/apis/networking\.k8s\.io/v1/namespaces/([^/]+)/networkpolicies(?:/([^/]+))?", "networkpolicies"),
            (r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", "log"),
            (r"/api/v1/namespaces/([^/]+)/pods", "pods"),
        ]
        for pattern, resource in routes:
            m = re.fullmatch(pattern, parsed.path)
            if m:
                watching = query.get("watch") == "true"
                applicable = [f for f in self.faults if watching or f not in ("drop", "gone")]
                if resource == "rayjobs" and method == "GET" and applicable:
                    fault = applicable[0]
                    self.faults.remove(fault)
                    if isinstance(fault, int):
                        return fault, _status(fault, "ServiceUnavailable" if fault == 503 else "InternalError",
                                              "the server is currently unable to handle the request")
                    if fault == "hang":
                        time.sleep(self.hang_seconds)
                    elif query.get("watch") == "true":
                        return 200, ("watch", m.group(1), query, fault)
                with self.lock:
                    return self._route(method, resource, m.group(1), m.group(2) if m.lastindex > 1 else None,
                                       query, headers, data)
        return 404, _status(404, "NotFound", f"the server could not find the requested resource ({parsed.path})")

    def _route(self, method, resource, ns, name, query, headers, data):
        key = (resource, ns, name)
        if resource == "log":
            if ("pods", ns, name) not in self.objects:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            return 200, ("stream" if query.get("follow") == "true" else "text", self.logs[(ns, name)])
        if method == "POST":
            return self._create(resource, ns, data)
        if name is None and query.get("watch") == "true":
            return 200, ("watch", ns, query, None)
        if name is None:  # list
            selector = dict(part.split("=", 1) for part in query.get("labelSelector", "").split(",") if part)
            items = [o for (r, n, _), o in self.objects.items() if r == resource and n == ns
                     and all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}
        if key not in self.objects:
            kind = "rayjobs.ray.io" if resource == "rayjobs" else resource
            return 404, _status(404, "NotFound", f'{kind} "{name}" not found')
        obj = self.objects[key]
        if method == "GET":
            if resource == "rayjobs":
                self.next_status(ns, name)
            return 200, obj
        if method == "PATCH":
            ctype = headers.get("Content-Type")
            if ctype == "application/json-patch+json" and not isinstance(data, list):
                return 400, _status(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
            if ctype == "application/strategic-merge-patch+json" and resource == "rayjobs":
                return 415, _status(415, "UnsupportedMediaType", "strategic merge patch is not supported for custom resources")
            if ctype != "application/merge-patch+json":
                return 415, _status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}")
            _merge(obj, data)
            obj["metadata"]["generation"] += 1
            return 200, obj
        if method == "DELETE":
            del self.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                         "details": {"name": name, "group": "ray.io", "kind": "rayjobs", "uid": obj["metadata"]["uid"]}}
        return 405, _status(405, "MethodNotAllowed", method)

    def watch_events(self, ns: str, query: dict, fault):
        """Events of a RayJob watch (fieldSelector metadata.name=<name>): one MODIFIED per pending status, then
        quiet until timeoutSeconds. Yields dicts; the string "drop" means: cut the connection here."""
        name = query.get("fieldSelector", "").removeprefix("metadata.name=")
        if fault == "gone":
            yield {"type": "ERROR", "object": _status(410, "Expired", "too old resource version: 1 (4242)")}
            return
        end = time.monotonic() + float(query.get("timeoutSeconds", 30))
        while time.monotonic() < end:
            with self.lock:
                if ("rayjobs", ns, name) not in self.objects:
                    return
                obj = self.next_status(ns, name)
            if obj is None:
                time.sleep(0.01)
                continue
            yield {"type": "MODIFIED", "object": obj}
            if fault == "drop":
                yield "drop"
                return
            time.sleep(0.005)

    def _create(self, resource, ns, data):
        name = data["metadata"]["name"]
        if (resource, ns, name) in self.objects:
            kind = "rayjobs.ray.io" if resource == "rayjobs" else resource
            return 409, _status(409, "AlreadyExists", f'{kind} "{name}" already exists')
        if data["metadata"].get("namespace", ns) != ns:
            return 400, _status(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
        obj = copy.deepcopy(data)
        obj["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), generation=1, resourceVersion="100",
                               creationTimestamp="2026-11-29T06:00:00Z")
        self.objects[(resource, ns, name)] = obj
        return 201, obj


class Handler(BaseHTTPRequestHandler):
    def _serve(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code, payload = self.server.kube.handle(self.command, self.path, self.headers, body)
        if isinstance(payload, tuple) and payload[0] == "watch":  # a chunked stream of JSON lines, as the API server
            _, ns, query, fault = payload
            self.protocol_version = "HTTP/1.1"
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for event in self.server.kube.watch_events(ns, query, fault):
                    if event == "drop":  # no closing chunk: the client sees a broken connection
                        self.close_connection = True
                        return
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on the watch (its own read timeout)
            self.close_connection = True
            return
        if isinstance(payload, tuple):  # pod log
            mode, lines = payload
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for line in lines:
                self.wfile.write(line.encode() + b"\n")
                self.wfile.flush()
                if mode == "stream":
                    time.sleep(0.02)  # the pod writes over time; the client must stream, not wait for the end
            return
        raw = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

    def log_message(self, *args):  # keep pytest output clean
        pass


def _start(kube: FakeKube, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.kube = kube
    if tls:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def kuberay_crds(shared_dir):
    from k8s_validate import load_crds

    return load_crds(shared_dir / "crds" / "kuberay-v1.7.0")


@pytest.fixture
def kube():
    return FakeKube()


@pytest.fixture
def api(kube, tmp_path):
    """The API server on a random port and a kubeconfig whose current context points at it (plus a context
    pointing at a closed port)."""
    server = _start(kube)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}},
                     {"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "tester", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": NS}},
                     {"name": "gone", "context": {"cluster": "gone", "user": "tester"}}],
    }))
    yield kubeconfig
    server.shutdown()
    server.server_close()


def run(kubeconfig: Path, *argv: str) -> int:
    return cli.main([*argv, "--kubeconfig", str(kubeconfig)])


def rayjob_status(dep: str, job: str | None = None, **extra) -> dict:
    st = {"jobDeploymentStatus": dep, "rayClusterName": "tiny-raycluster-x7k2p", "jobId": "tiny-hq8d2",
          "startTime": "2026-11-29T06:00:02Z", "failed": 0, "succeeded": 0}  # as KubeRay v1.7.0 writes it
    if job:
        st["jobStatus"] = job
    st.update(extra)
    return st


def put_rayjob(kube: FakeKube, name: str, statuses: list[dict], suspend: bool = False):
    kube.objects[("rayjobs", NS, name)] = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1},
        "spec": {"entrypoint": "dolly-train train --config /etc/dolly-train/train.yaml", "suspend": suspend},
    }
    kube.statuses[(NS, name)] = list(statuses)


# ---- submit ------------------------------------------------------------------------------------------------------

HELM_LIKE = """\
---
# Source: dolly-train/templates/serviceaccount.yaml
apiVersion: v1
kind: ServiceAccount
metadata:
  name: dolly-train
---
# Source: dolly-train/templates/configmap.yaml
apiVersion: v1
kind: ConfigMap
metadata:
  name: dolly-train-config
data:
  train.yaml: |
    seed: 42
---
# Source: dolly-train/templates/rayjob.yaml
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: dolly-train
  namespace: somewhere-else
  labels:
    app.kubernetes.io/instance: dolly-train
spec:
  entrypoint: dolly-train train --config /etc/dolly-train/train.yaml
  shutdownAfterJobFinishes: true
  rayClusterSpec:
    rayVersion: "2.60.0"
    headGroupSpec:
      rayStartParams: {}
      template:
        spec:
          containers:
            - name: ray-head
              image: ghcr.io/dolly-train/trainer:0.1.0
"""


def test_submit_file_picks_the_rayjob_out_of_helm_template_output(api, kube, tmp_path, capsys):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(HELM_LIKE)
    assert run(api, "submit", "--file", str(rendered), "-n", NS) == 0
    posts = [r for r in kube.requests if r["method"] == "POST"]
    assert [r["path"] for r in posts] == [f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"]
    assert posts[0]["body"]["spec"]["entrypoint"].startswith("dolly-train train")
    assert ("rayjobs", NS, "dolly-train") in kube.objects
    out = capsys.readouterr()
    assert f"rayjob.ray.io/dolly-train created in namespace {NS}" in out.out
    assert "ServiceAccount/dolly-train" in out.err and "ConfigMap/dolly-train-config" in out.err


def test_submit_file_without_a_rayjob_or_with_two(api, kube, tmp_path, capsys):
    only_cm = tmp_path / "cm.yaml"
    only_cm.write_text(HELM_LIKE.split("# Source: dolly-train/templates/rayjob.yaml")[0])
    assert run(api, "submit", "--file", str(only_cm), "-n", NS) == 1
    err = capsys.readouterr().err
    assert str(only_cm) in err and "no ray.io/v1 RayJob" in err and "ConfigMap/dolly-train-config" in err

    two = tmp_path / "two.yaml"
    two.write_text(HELM_LIKE + "---\n" + HELM_LIKE.split("# Source: dolly-train/templates/rayjob.yaml")[1]
                   .replace("name: dolly-train\n", "name: dolly-train-b\n", 1))
    assert run(api, "submit", "--file", str(two), "-n", NS) == 1
    assert "2 RayJobs (dolly-train, dolly-train-b); pick one with --name" in capsys.readouterr().err
    assert run(api, "submit", "--file", str(two), "-n", NS, "--name", "dolly-train-b") == 0
    assert ("rayjobs", NS, "dolly-train-b") in kube.objects and ("rayjobs", NS, "dolly-train") not in kube.objects


def test_submit_bad_yaml_names_the_file(api, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: RayJob\nspec: [unclosed\n")
    assert run(api, "submit", "--file", str(bad)) == 1
    assert f"--file {bad}: not valid YAML" in capsys.readouterr().err


def test_submit_config_builds_rayjob_and_owned_configmap(api, kube, capsys, kuberay_crds):
    overrides = ["model.path=/mnt/dolly/models/tiny", "data.path=/mnt/dolly/data/synthetic",
                 "checkpoint.storage_path=/mnt/dolly/runs", "schedule.max_steps=5"]
    assert run(api, "submit", "-n", NS, "--config", "cpu-tiny", "--image", "ghcr.io/dolly-train/cpu:0.1.0",
               "--name", "tiny", "--pvc", "dolly-train-shared", *overrides) == 0
    cm = kube.objects[("configmaps", NS, "tiny-config")]
    job = kube.objects[("rayjobs", NS, "tiny")]
    # train.yaml in the ConfigMap is the resolved config, loadable by the trainer on the other side.
    expected = config_mod.load("cpu-tiny", overrides)
    assert config_mod.from_dict(yaml.safe_load(cm["data"]["train.yaml"])) == expected
    # The ConfigMap is owned by the created RayJob (its server-assigned uid), so deleting the job removes it.
    patch = next(r for r in kube.requests if r["method"] == "PATCH")
    assert patch["content_type"] == "application/merge-patch+json"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    spec = job["spec"]
    assert spec["entrypoint"] == "dolly-train train --config /etc/dolly-train/train.yaml"
    assert spec["rayClusterSpec"]["rayVersion"] == rayjob.RAY_VERSION
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == expected.scaling.num_workers == 2
    pod = workers["template"]["spec"]
    assert {"claimName": "dolly-train-shared"} in [v.get("persistentVolumeClaim") for v in pod["volumes"]]
    assert pod["containers"][0]["image"] == "ghcr.io/dolly-train/cpu:0.1.0"
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    from k8s_validate import validate_objects, validate_pod_templates

    assert validate_objects([job, cm], kuberay_crds) + validate_pod_templates(job) == []


def test_submit_config_conflict_removes_its_configmap(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING")])
    overrides = ["model.path=/m", "data.path=/d", "checkpoint.storage_path=/runs"]
    assert run(api, "submit", "-n", NS, "--config", "cpu-tiny", "--image", "img:1", "--name", "tiny",
               "--pvc", "shared", *overrides) == 1
    assert 'AlreadyExists (409): rayjobs.ray.io "tiny" already exists' in capsys.readouterr().err
    assert ("configmaps", NS, "tiny-config") not in kube.objects
    assert ("networkpolicies", NS, "tiny-ray") not in kube.objects
    assert [(r["method"], r["path"].rsplit("/", 1)[-1] if r["method"] == "POST" else r["path"].split("/")[-2])
            for r in kube.requests] == [("POST", "networkpolicies"), ("POST", "configmaps"), ("POST", "rayjobs"),
                                        ("DELETE", "configmaps"), ("DELETE", "networkpolicies")]


def test_submit_config_rejects_bad_input_before_any_request(api, kube, capsys):
    assert run(api, "submit", "--config", "cpu-tiny", "--image", "i", "--name", "Bad_Name",
               "model.path=/m", "data.path=/d") == 1
    assert "--name 'Bad_Name'" in capsys.readouterr().err
    assert run(api, "submit", "--config", "cpu-tiny", "--image", "i", "--name", "ok", "optim.lr=fast") == 2
    assert "optim.lr: expected a number, got 'fast'" in capsys.readouterr().err
    # cpu-tiny's storage_path (work/runs) is relative: in a pod it would miss the shared volume.
    assert run(api, "submit", "--config", "cpu-tiny", "--image", "i", "--name", "ok", "model.path=/m",
               "data.path=/d") == 1
    assert "checkpoint.storage_path: 'work/runs' must be an absolute path" in capsys.readouterr().err
    assert kube.requests == []


def test_submit_dry_run_prints_valid_objects_and_sends_nothing(api, kube, capsys, kuberay_crds):
    from k8s_validate import validate_objects

    assert run(api, "submit", "--config", "cpu-tiny", "--image", "i:1", "--name", "tiny", "--dry-run",
               "--pvc", "shared", "model.path=/m", "data.path=/d", "checkpoint.storage_path=s3://bucket/runs") == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    docs.sort(key=lambda d: d["kind"])
    assert [d["kind"] for d in docs] == ["ConfigMap", "NetworkPolicy", "RayJob"] and kube.requests == []
    assert yaml.safe_load(docs[0]["data"]["train.yaml"])["checkpoint"]["storage_path"] == "s3://bucket/runs"
    assert validate_objects(docs, kuberay_crds) == []


# ---- status / wait -----------------------------------------------------------------------------------------------

def test_status_table_json_and_not_found(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Failed", "RUNNING", reason="DeadlineExceeded", failed=1,
                                            message="The RayJob has passed the activeDeadlineSeconds.")])
    assert run(api, "status", "tiny", "-n", NS) == 0
    out = capsys.readouterr().out
    assert re.search(r"job status\s+RUNNING", out) and re.search(r"deployment\s+Failed", out)
    assert re.search(r"reason\s+DeadlineExceeded", out) and re.search(r"outcome\s+failed", out)
    assert run(api, "status", "tiny", "-n", NS, "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["reason"] == "DeadlineExceeded"
    assert run(api, "status", "nope", "-n", NS) == 1
    assert f'RayJob nope in namespace {NS}: NotFound (404): rayjobs.ray.io "nope" not found' in capsys.readouterr().err


def test_wait_follows_transitions_to_success(api, kube, capsys):
    put_rayjob(kube, "tiny", [{}, rayjob_status("Initializing"), rayjob_status("Running", "PENDING"),
                              rayjob_status("Running", "RUNNING"), rayjob_status("Running", "RUNNING"),
                              rayjob_status("Running", "SUCCEEDED"), rayjob_status("Complete", "SUCCEEDED", succeeded=1)])
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "20") == 0
    out = capsys.readouterr().out
    seen = re.findall(r"tiny: (deployment \S+, job \S+)", out)
    assert seen == ["deployment New, job -", "deployment Initializing, job -", "deployment Running, job PENDING",
                    "deployment Running, job RUNNING", "deployment Running, job SUCCEEDED",
                    "deployment Complete, job SUCCEEDED"]
    assert out.rstrip().endswith("tiny: SUCCEEDED")


@pytest.mark.parametrize(("status", "needle"), [
    (rayjob_status("Failed", "FAILED", reason="AppFailed", message="Job failed due to an application error"),
     "[AppFailed]: Job failed due to an application error"),
    (rayjob_status("Failed", "RUNNING", reason="DeadlineExceeded", message="passed activeDeadlineSeconds"),
     "KubeRay gave up while the Ray job last reported RUNNING"),
    (rayjob_status("Running", "FAILED"), "deployment Running, job FAILED"),
    ({"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed",
      "message": "RayJob name should be no more than 47 characters"}, "[ValidationFailed]"),
    (rayjob_status("Complete", "STOPPED"), "job STOPPED"),
], ids=["app-failed", "deadline-while-running", "failed-before-deployment", "validation", "stopped"])
def test_wait_fails_on_every_kind_of_failure(api, kube, capsys, status, needle):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING"), status])
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "20") == 1
    err = capsys.readouterr().err
    assert "tiny: FAILED" in err and needle in err


def test_wait_keeps_waiting_while_suspended_then_times_out(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Suspended")], suspend=True)
    start = time.monotonic()
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.05", "--timeout", "0.4") == 124
    assert 0.4 <= time.monotonic() - start < 5
    assert "timed out after 0.4 s (deployment Suspended, job -, suspended)" in capsys.readouterr().err


def test_wait_exit_codes_through_the_console_script(api, kube, tmp_path):
    """The installed `dolly-train` entry point, as CI and kind-smoke.sh run it: exit status 124 on timeout."""
    exe = shutil.which("dolly-train", path=str(Path(sys.executable).parent))
    assert exe, "dolly-train console script is not installed in this venv"
    put_rayjob(kube, "slow", [rayjob_status("Running", "RUNNING")])
    proc = subprocess.run([exe, "wait", "slow", "-n", NS, "--kubeconfig", str(api), "--poll", "0.05",
                           "--timeout", "0.3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 124, proc.stderr
    assert "slow: timed out" in proc.stderr


# ---- logs / suspend / resume / delete ----------------------------------------------------------------------------

def test_logs_prints_the_newest_submitter_pod_and_follows(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING")])
    kube.add_pod(NS, "tiny-abcde", "tiny", "2026-11-29T06:01:00Z", ["attempt 1", "dashboard not ready"])
    kube.add_pod(NS, "tiny-fghij", "tiny", "2026-11-29T06:03:00Z", ["attempt 2", "step 10 loss 2.31"])
    kube.add_pod(NS, "other-zzzzz", "other", "2026-11-29T06:04:00Z", ["not ours"])
    assert run(api, "logs", "tiny", "-n", NS) == 0
    assert capsys.readouterr().out == "attempt 2\nstep 10 loss 2.31\n"
    assert run(api, "logs", "tiny", "-n", NS, "--all") == 0
    out = capsys.readouterr().out
    assert out.index("==> pod tiny-abcde") < out.index("dashboard not ready") < out.index("==> pod tiny-fghij")
    assert "not ours" not in out
    kube.logs[(NS, "tiny-fghij")] = [f"step {i}" for i in range(30)]
    assert run(api, "logs", "tiny", "-n", NS, "--follow") == 0
    assert capsys.readouterr().out.splitlines() == [f"step {i}" for i in range(30)]
    follow = [r for r in kube.requests if r["path"].endswith("/log") and r["query"].get("follow") == "true"]
    assert [r["path"] for r in follow] == [f"/api/v1/namespaces/{NS}/pods/tiny-fghij/log"]


def test_logs_without_submitter_pod_says_why(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Initializing")])
    assert run(api, "logs", "tiny", "-n", NS) == 1
    assert "no submitter pod yet (label job-name=tiny" in capsys.readouterr().err


def test_suspend_resume_patch_spec_suspend(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING")])
    assert run(api, "suspend", "tiny", "-n", NS) == 0
    assert kube.objects[("rayjobs", NS, "tiny")]["spec"]["suspend"] is True
    assert run(api, "resume", "tiny", "-n", NS) == 0
    assert kube.objects[("rayjobs", NS, "tiny")]["spec"]["suspend"] is False
    patches = [r for r in kube.requests if r["method"] == "PATCH"]
    assert [p["body"] for p in patches] == [{"spec": {"suspend": True}}, {"spec": {"suspend": False}}]
    assert {p["content_type"] for p in patches} == {"application/merge-patch+json"}
    out = capsys.readouterr().out
    assert "tiny suspended (spec.suspend=true)" in out and "tiny resumed (spec.suspend=false)" in out


def test_delete_uses_foreground_propagation(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Complete", "SUCCEEDED")])
    assert run(api, "delete", "tiny", "-n", NS) == 0
    assert ("rayjobs", NS, "tiny") not in kube.objects
    delete = next(r for r in kube.requests if r["method"] == "DELETE")
    assert delete["query"].get("propagationPolicy") == "Foreground" or \
        (delete["body"] or {}).get("propagationPolicy") == "Foreground"
    assert run(api, "delete", "tiny", "-n", NS) == 1
    assert "NotFound (404)" in capsys.readouterr().err


# ---- credentials -------------------------------------------------------------------------------------------------

def test_context_flag_and_unreachable_server(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING")])
    assert run(api, "status", "tiny", "-n", NS, "--context", "fake") == 0
    capsys.readouterr()
    assert run(api, "status", "tiny", "-n", NS, "--context", "gone") == 1
    assert "cannot reach the API server at http://127.0.0.1:9" in capsys.readouterr().err
    assert run(api, "status", "tiny", "-n", NS, "--context", "missing") == 1
    assert "context missing" in capsys.readouterr().err


def test_wrong_token_is_reported(api, kube, capsys):
    api.write_text(api.read_text().replace(TOKEN, "stale-token"))
    assert run(api, "status", "tiny", "-n", NS) == 1
    assert "Unauthorized (401)" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make the test server's TLS cert")
def test_in_cluster_service_account_fallback(kube, tmp_path, monkeypatch, capsys):
    """No kubeconfig anywhere: the client uses KUBERNETES_SERVICE_HOST/PORT, the service-account token and the
    cluster CA, over HTTPS, as in a pod."""
    cert, key = tmp_path / "ca.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = _start(kube, tls)
    try:
        token = tmp_path / "token"
        token.write_text(TOKEN)
        from kubernetes.config import incluster_config

        # The well-known paths of a pod's service-account mount, pointed at this test's files.
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_port))
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.delenv("KUBECONFIG", raising=False)
        put_rayjob(kube, "tiny", [rayjob_status("Complete", "SUCCEEDED", succeeded=1)])
        assert cli.main(["wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "10"]) == 0
        assert "tiny: SUCCEEDED" in capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()


def test_no_credentials_at_all(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["status", "tiny"]) == 1
    assert "no Kubernetes credentials" in capsys.readouterr().err


def test_ray_version_matches_pyproject_pin(repo):
    pin = re.search(r'"ray\[[a-z,]*train\]==([0-9.]+)"', (repo / "pyproject.toml").read_text()).group(1)
    assert rayjob.RAY_VERSION == pin


def test_every_subcommand_has_help(capsys):
    for command in ("submit", "status", "wait", "logs", "suspend", "resume", "delete"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert "--kubeconfig" in capsys.readouterr().out


# ---- KubeRay's real transitions, retries and API trouble through `dolly-train wait` --------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
RAYJOB_TESTDATA = REPO_ROOT / "manifests" / "argocd" / "resource_customizations" / "ray.io" / "RayJob" / "testdata"


def put_fixture_sequence(kube: FakeKube, name: str, fixtures: list[str]) -> None:
    """A RayJob whose spec is the chart's (backoffLimit 1) and whose statuses are the health-check testdata, in the
    order KubeRay v1.7.0 writes them (see the comments in those files)."""
    objs = [yaml.safe_load((RAYJOB_TESTDATA / f"{f}.yaml").read_text()) for f in fixtures]
    first = copy.deepcopy(objs[0])
    first["metadata"] = {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1,
                         "resourceVersion": "100"}
    first.pop("status", None)
    kube.objects[("rayjobs", NS, name)] = first
    kube.statuses[(NS, name)] = [o.get("status") or {} for o in objs]


def test_wait_retrying_then_success_is_not_a_failure(api, kube, capsys):
    """FAILED + Retrying, then a new attempt RUNNING, then SUCCEEDED + Complete: exit 0, each attempt named."""
    from test_health_lua import RETRY_SEQUENCE

    put_fixture_sequence(kube, "tiny", RETRY_SEQUENCE)
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "30") == 0
    out, err = capsys.readouterr()
    assert "FAILED -" not in err and out.rstrip().endswith("tiny: SUCCEEDED")
    seen = [s.strip() for s in re.findall(r"tiny: (deployment \S+, job \S+, [^:\[\n]+)", out)]
    assert seen == [
        "deployment New, job -, attempt 1/2", "deployment Initializing, job -, attempt 1/2",
        "deployment Running, job -, attempt 1/2", "deployment Running, job PENDING, attempt 1/2",
        "deployment Running, job RUNNING, attempt 1/2",
        "deployment Running, job FAILED, attempt 1/2 failed, KubeRay will retry",
        "deployment Retrying, job FAILED, attempt 1/2 failed, retrying on a new RayCluster (attempt 2/2)",
        "deployment New, job -, attempt 2/2", "deployment Initializing, job -, attempt 2/2",
        "deployment Running, job RUNNING, attempt 2/2", "deployment Complete, job SUCCEEDED, attempt 2/2"]
    # The statuses arrived through the watch, not by re-reading: one GET, then watch events.
    watches = [r for r in kube.requests if r["query"].get("watch") == "true"]
    assert watches and watches[0]["query"]["fieldSelector"] == "metadata.name=tiny"


def test_wait_fails_when_the_last_attempt_fails(api, kube, capsys):
    put_fixture_sequence(kube, "tiny", ["retry-running", "last-attempt-job-failed", "failed"])
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "30") == k8s_cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "tiny: FAILED" in err and "attempt 2/2 failed, no retry left" in err


def test_wait_survives_a_dropped_watch_and_an_expired_resource_version(api, kube, capsys):
    from test_health_lua import RETRY_SEQUENCE

    put_fixture_sequence(kube, "tiny", RETRY_SEQUENCE)
    kube.faults = ["drop", "gone", "drop"]  # each for the next watch request
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "30") == 0
    out, err = capsys.readouterr()
    assert "connection to" in err and "lost" in err  # the drop was seen as a transient error and retried
    assert "deployment Retrying, job FAILED" in out and out.rstrip().endswith("tiny: SUCCEEDED")
    watches = [r for r in kube.requests if r["query"].get("watch") == "true"]
    assert len(watches) >= 3 and kube.faults == []
    # Each resumed watch starts from the resourceVersion of a fresh read, never from the beginning.
    assert all(int(w["query"]["resourceVersion"]) > 100 for w in watches)


def test_wait_retries_transient_api_errors_with_backoff(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING"), rayjob_status("Complete", "SUCCEEDED", succeeded=1)])
    kube.faults = [503, 500, 429]
    start = time.monotonic()
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.05", "--timeout", "30") == 0
    err = capsys.readouterr().err
    assert err.count("API error, retrying in") == 3 and "ServiceUnavailable (503)" in err
    delays = [float(d) for d in re.findall(r"retrying in ([0-9.]+) s", err)]
    assert delays == sorted(delays) and delays[-1] > delays[0]  # backing off
    assert time.monotonic() - start < 10


def test_wait_exit_codes_tell_api_trouble_from_job_failure(api, kube, capsys, tmp_path, monkeypatch):
    put_rayjob(kube, "tiny", [rayjob_status("Failed", "FAILED", reason="AppFailed", failed=1, message="boom")])
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "5") == k8s_cli.EXIT_FAILED == 1
    # No such RayJob, rejected credentials, an unreachable server: 69, never the job-failed code.
    assert run(api, "wait", "nope", "-n", NS, "--timeout", "5") == k8s_cli.EXIT_API == 69
    assert "NotFound (404)" in capsys.readouterr().err
    start = time.monotonic()
    assert run(api, "wait", "tiny", "-n", NS, "--context", "gone", "--poll", "0.05", "--timeout", "1.5") == 69
    assert time.monotonic() - start < 15
    assert "cannot reach the API server" in capsys.readouterr().err
    bad = tmp_path / "stale"
    bad.write_text(api.read_text().replace(TOKEN, "stale-token"))
    assert run(bad, "wait", "tiny", "-n", NS, "--timeout", "5") == 69
    assert "Unauthorized (401)" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["wait", "tiny", "--timeout", "5"]) == 69
    assert "no Kubernetes credentials" in capsys.readouterr().err


def test_wait_never_outlasts_its_timeout_on_a_hung_connection(api, kube, capsys):
    put_rayjob(kube, "tiny", [rayjob_status("Running", "RUNNING")])
    kube.faults, kube.hang_seconds = ["hang"], 20.0
    start = time.monotonic()
    code = run(api, "wait", "tiny", "-n", NS, "--poll", "0.05", "--timeout", "1")
    assert time.monotonic() - start < 5, "a hung request outlasted --timeout"
    assert code == k8s_cli.EXIT_API  # the only read never answered: the API, not the job, is the problem
    assert "timed out" in capsys.readouterr().err.lower()


def test_wait_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["wait", "--help"])
    out = capsys.readouterr().out
    for code in ("0", "1", "124", "69"):
        assert re.search(rf"^\s+{code}\s+\S", out, re.M), code
    assert "Retrying" in out


# ---- one RayJob builder: submit --config sends the chart's RayJob ---------------------------------------------

def test_submit_config_sends_the_same_rayjob_as_helm_template(api, kube, tmp_path, capsys, kuberay_crds):
    """`submit --config` and `helm template` with the same settings give the same objects: the submitted RayJob
    has the chart's container security context, /dev/shm, deadlines, backoffLimit, submitter template, GPU
    tolerations, token auth and NetworkPolicy."""
    from k8s_validate import tool, validate_objects, validate_pod_templates

    chart = REPO_ROOT / "charts" / "dolly-train"
    smoke = yaml.safe_load((chart / "values-cpu-smoke.yaml").read_text())
    # The user's values for `helm install`: the smoke values, the model and data already on an existing claim.
    user_values = {k: v for k, v in smoke.items() if k != "train"}
    user_file = tmp_path / "user-values.yaml"
    user_file.write_text(yaml.safe_dump(user_values))
    install = tmp_path / "install-values.yaml"
    install.write_text(yaml.safe_dump({"fullnameOverride": "dolly-smoke", "serviceAccount": {"create": False},
                                       "progress": {"enabled": False},
                                       "storage": {"existingClaim": "shared-rwx"}, "staging": {"enabled": False}}))
    res = subprocess.run([tool("helm"), "template", "dolly-smoke", str(chart), "-n", NS, "-f", str(chart / "values-cpu-smoke.yaml"),
                          "-f", str(install)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    helm_objs = {o["kind"]: o for o in yaml.safe_load_all(res.stdout) if o}
    train_file = tmp_path / "train.yaml"
    train_file.write_text(helm_objs["ConfigMap"]["data"]["train.yaml"])

    assert run(api, "submit", "-n", NS, "--config", str(train_file), "--image", "ghcr.io/dolly-train/cpu:0.1.0",
               "--name", "dolly-smoke", "--pvc", "shared-rwx", "--values", str(user_file)) == 0
    sent = {r["body"]["kind"]: r["body"] for r in kube.requests if r["method"] == "POST"}
    assert set(sent) == {"ConfigMap", "NetworkPolicy", "RayJob"}
    for kind, obj in sent.items():
        assert obj["spec" if kind != "ConfigMap" else "data"] == helm_objs[kind]["spec" if kind != "ConfigMap" else "data"], kind
        assert obj["metadata"]["labels"] == helm_objs[kind]["metadata"]["labels"], kind
    spec = sent["RayJob"]["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["backoffLimit"] >= 0 and spec["activeDeadlineSeconds"] and spec["preRunningDeadlineSeconds"]
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    for _, tmpl in kv_pod_templates(sent["RayJob"]):
        for c in tmpl["spec"]["containers"]:
            assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in worker["volumes"])
    assert validate_objects(list(sent.values()), kuberay_crds) + validate_pod_templates(sent["RayJob"]) == []
    # Every created object is owned by the RayJob.
    uid = kube.objects[("rayjobs", NS, "dolly-smoke")]["metadata"]["uid"]
    for resource, name in (("configmaps", "dolly-smoke-config"), ("networkpolicies", "dolly-smoke-ray")):
        assert kube.objects[(resource, NS, name)]["metadata"]["ownerReferences"][0]["uid"] == uid

    # A GPU config gets the chart's GPU tolerations and one GPU per worker pod.
    capsys.readouterr()
    assert run(api, "submit", "--config", "mistral-7b-zero3", "--image", "ghcr.io/dolly-train/trainer:0.1.0",
               "--name", "big", "--pvc", "shared-rwx", "--dry-run", "model.path=/mnt/dolly/models/m",
               "data.path=/mnt/dolly/data/d", "checkpoint.storage_path=/mnt/dolly/runs") == 0
    (big,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d["kind"] == "RayJob"]
    g = big["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert g["replicas"] == 8 and g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in g["template"]["spec"]["tolerations"]


def kv_pod_templates(obj):
    from k8s_validate import pod_templates

    return pod_templates(obj)


def test_submit_values_may_not_set_train(api, kube, tmp_path, capsys):
    vf = tmp_path / "v.yaml"
    vf.write_text("train: {seed: 1}\n")
    assert run(api, "submit", "--config", "cpu-tiny", "--image", "i:1", "--name", "t", "--pvc", "p", "--values", str(vf),
               "model.path=/m", "data.path=/d", "checkpoint.storage_path=/r") == 1
    assert "sets `train`" in capsys.readouterr().err and kube.requests == []


# ---- Kueue: a RayJob waiting for admission is queued, not failed or stuck -------------------------------------------

def put_kueue_sequence(kube: FakeKube, name: str, fixtures: list[str]) -> None:
    """Like put_fixture_sequence, with the Kueue label and the spec.suspend flips (Kueue's admission and preemption)
    of each fixture replayed along with its status."""
    put_fixture_sequence(kube, name, fixtures)
    objs = [yaml.safe_load((RAYJOB_TESTDATA / f"{f}.yaml").read_text()) for f in fixtures]
    first = kube.objects[("rayjobs", NS, name)]
    first["metadata"]["labels"] = objs[0]["metadata"]["labels"]
    kube.spec_changes[(NS, name)] = [{"suspend": o["spec"]["suspend"], "generation": o["metadata"]["generation"]}
                                     for o in objs]


def test_wait_reports_queued_then_admitted_then_success(api, kube, capsys):
    """Created suspended with kueue.x-k8s.io/queue-name; KubeRay walks it to Suspended (no cluster); Kueue admits it
    (spec.suspend false); it runs and succeeds: every step before admission reads "queued", none is a failure."""
    from test_health_lua import KUEUE_SEQUENCE

    sequence = KUEUE_SEQUENCE[:KUEUE_SEQUENCE.index("kueue-running") + 1] + ["succeeded"]
    put_kueue_sequence(kube, "tiny", sequence)
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "30") == 0
    out, err = capsys.readouterr()
    assert "FAILED" not in err and out.rstrip().endswith("tiny: SUCCEEDED")
    lines = re.findall(r"tiny: (.+)", out)
    queued = [line for line in lines if line.startswith("queued in Kueue LocalQueue team-a")]
    assert [re.search(r"deployment (\w*)", q).group(0) for q in queued] == [
        "deployment New", "deployment Initializing", "deployment Suspending", "deployment Suspended"], lines
    assert all("waiting for Kueue to admit the whole RayCluster" in q for q in queued)
    assert any(line.startswith("admitted by Kueue, KubeRay is starting it; deployment Suspended") for line in lines)
    assert lines.index(queued[-1]) < next(i for i, line in enumerate(lines) if "deployment Running, job RUNNING" in line)
    assert "suspended" not in " ".join(queued)  # queued, not a person's suspend


def test_status_says_queued_and_wait_times_out_while_queued(api, kube, capsys):
    put_kueue_sequence(kube, "tiny", ["kueue-queued"])
    assert run(api, "status", "tiny", "-n", NS) == 0
    out = capsys.readouterr().out
    assert re.search(r"outcome\s+queued", out) and re.search(r"kueue queue\s+team-a", out), out
    assert run(api, "status", "tiny", "-n", NS, "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "queued"
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.05", "--timeout", "0.4") == k8s_cli.EXIT_TIMEOUT
    assert "timed out after 0.4 s (queued in Kueue LocalQueue team-a" in capsys.readouterr().err


def test_wait_keeps_waiting_through_a_kueue_preemption(api, kube, capsys):
    put_kueue_sequence(kube, "tiny", ["kueue-running", "kueue-preempted", "kueue-queued", "kueue-admitted",
                                      "kueue-admitted-new", "kueue-running", "succeeded"])
    assert run(api, "wait", "tiny", "-n", NS, "--poll", "0.01", "--timeout", "30") == 0
    out = capsys.readouterr().out
    assert "queued in Kueue LocalQueue team-a (preempted by Kueue, KubeRay is deleting its RayCluster)" in out, out


def test_resume_refuses_a_kueue_managed_rayjob(api, kube, capsys):
    put_kueue_sequence(kube, "tiny", ["kueue-queued"])
    assert run(api, "resume", "tiny", "-n", NS) == 1
    assert "managed by Kueue (LocalQueue team-a)" in capsys.readouterr().err
    assert not [r for r in kube.requests if r["method"] == "PATCH"]
