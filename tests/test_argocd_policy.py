"""The bootstrap's ValidatingAdmissionPolicy (manifests/argocd/policy/root-children.yaml): an Application that the
dolly-train-root app creates must belong to the workload or the platform project.

No API server runs here: the policy is evaluated the way the API server's admission plugin does - the binding's
namespace selector and the policy's resource rules put a request in scope, every matchCondition must be true, and
the first false validation denies with its messageExpression - with the CEL run by cel-python (`celpy`, a CEL-spec
implementation). Faithful for these expressions (field selection, has() on fields and map keys, `in` on a list,
startsWith, string concatenation, the conditional operator, && and || with CEL's error absorption); not done:
the API server's type check of the expressions against the Application CRD's schema when the policy is created.
The objects themselves are checked against the Kubernetes 1.30 schema. The Applications are the real children
the root app renders, marked the way Argo CD marks what it applies (tracking annotation or label)."""

from __future__ import annotations

import copy
import fnmatch
from pathlib import Path

import celpy
import pytest
import yaml

from k8s_validate import validate_objects

REPO = Path(__file__).resolve().parents[1]
ARGO = REPO / "manifests" / "argocd"


class Denied(Exception):
    pass


def cel(expr: str, obj: dict):
    env = celpy.Environment()
    return env.program(env.compile(expr)).evaluate({"object": celpy.json_to_cel(obj)})


def admit(policy: dict, binding: dict, operation: str, namespace: str, obj: dict, namespace_labels: dict) -> bool:
    """True when the policy applies and admits, False when it does not apply; Denied(message) when it denies."""
    if any(namespace_labels.get(k) != v for k, v in binding["spec"]["matchResources"]["namespaceSelector"]
           .get("matchLabels", {}).items()):
        return False
    group = obj["apiVersion"].split("/")[0]
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    if not any(group in r["apiGroups"] and operation in r["operations"] and "applications" in r["resources"]
               and any(fnmatch.fnmatch(obj["apiVersion"].split("/")[1], v) for v in r["apiVersions"]) for r in rules):
        return False
    if not all(bool(cel(c["expression"], obj)) for c in policy["spec"].get("matchConditions", [])):
        return False
    assert binding["spec"]["validationActions"] == ["Deny"]
    for v in policy["spec"]["validations"]:
        if not bool(cel(v["expression"], obj)):
            raise Denied(str(cel(v["messageExpression"], obj)))
    return True


@pytest.fixture(scope="module")
def policy():
    docs = [d for d in yaml.safe_load_all((ARGO / "policy" / "root-children.yaml").read_text()) if d]
    pol = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    binding = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding")
    return pol, binding


def children() -> list[dict]:
    return [d for p in sorted((ARGO / "apps").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())
            if d and d["kind"] == "Application"]


def tracked(app: dict, how: str, root: str = "dolly-train-root") -> dict:
    """An Application as Argo CD applies it for `root`: with its tracking annotation (Argo CD >= 3.0) or label."""
    app = copy.deepcopy(app)
    md = app["metadata"]
    if how == "annotation":
        md.setdefault("annotations", {})["argocd.argoproj.io/tracking-id"] = \
            f"{root}:argoproj.io/Application:argocd/{md['name']}"
    else:
        md.setdefault("labels", {})["app.kubernetes.io/instance"] = root
    return app


ARGOCD_NS = {"kubernetes.io/metadata.name": "argocd"}


def test_policy_objects_validate_and_are_in_the_bootstrap(policy):
    pol, binding = policy
    assert validate_objects([pol, binding], k8s_version="1.30") == []
    assert binding["spec"]["policyName"] == pol["metadata"]["name"] and pol["spec"]["failurePolicy"] == "Fail"
    kustomization = yaml.safe_load((ARGO / "kustomization.yaml").read_text())
    assert "policy/root-children.yaml" in kustomization["resources"]
    # Not something Argo CD syncs: no project of this setup may create or change it. The platform project may
    # create admission policy objects only by exact name (the chart's progress policy,
    # apps/dolly-train-progress-policy.yaml), none of which is this policy's or its binding's.
    projects = [d for p in (ARGO / "projects").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    ours = {(d["kind"], d["metadata"]["name"]) for d in (pol, binding)}
    for proj in projects:
        for e in proj["spec"].get("clusterResourceWhitelist") or []:
            if not fnmatch.fnmatchcase("admissionregistration.k8s.io", e["group"]):
                continue
            where = (proj["metadata"]["name"], e)
            assert "name" in e and not any(c in e["name"] + e["kind"] for c in "*?["), where
            assert not any(fnmatch.fnmatchcase(k, e["kind"]) and fnmatch.fnmatchcase(n, e["name"]) for k, n in ours), where


@pytest.mark.parametrize("how", ["annotation", "label"])
def test_the_root_apps_children_are_admitted(policy, how):
    pol, binding = policy
    apps = children()
    assert len(apps) == 6
    for app in apps:
        for op in ("CREATE", "UPDATE"):
            assert admit(pol, binding, op, "argocd", tracked(app, how), ARGOCD_NS) is True, app["metadata"]["name"]


@pytest.mark.parametrize("how", ["annotation", "label"])
@pytest.mark.parametrize("project", ["dolly-train-root", "default", "someone-elses"])
def test_a_child_of_another_project_is_denied(policy, how, project):
    pol, binding = policy
    app = tracked(children()[0], how)
    app["spec"]["project"] = project
    with pytest.raises(Denied) as e:
        admit(pol, binding, "CREATE", "argocd", app, ARGOCD_NS)
    assert str(e.value) == (f"Application {app['metadata']['name']} comes from the dolly-train-root app, which may "
                            "create Applications of the projects dolly-train and dolly-train-platform only, not "
                            f"{project}")
    no_project = tracked(children()[0], how)
    del no_project["spec"]["project"]
    with pytest.raises(Denied, match=r"only, not \(none\)$"):
        admit(pol, binding, "UPDATE", "argocd", no_project, ARGOCD_NS)


def test_other_applications_are_out_of_scope(policy):
    """Another team's Applications (another root, or none), and anything outside `argocd`, are not this policy's."""
    pol, binding = policy
    app = copy.deepcopy(children()[0])
    app["spec"]["project"] = "default"
    assert admit(pol, binding, "CREATE", "argocd", app, ARGOCD_NS) is False
    assert admit(pol, binding, "CREATE", "argocd", tracked(app, "annotation", root="team-b-root"), ARGOCD_NS) is False
    assert admit(pol, binding, "CREATE", "argocd", tracked(app, "annotation", root="dolly-train-root-2"), ARGOCD_NS) \
        is False  # the tracking id's app name ends at the colon
    assert admit(pol, binding, "CREATE", "apps", tracked(app, "label"), {"kubernetes.io/metadata.name": "apps"}) is False
    assert admit(pol, binding, "DELETE", "argocd", tracked(app, "label"), ARGOCD_NS) is False
