"""Least privilege in GitOps (manifests/argocd/projects): every Application is rendered the way Argo CD would
render it (the root app's directory, the dolly-train chart with its value files, the eval Job, the volume, the
namespace, KubeRay's operator chart and CRDs from tests/fixtures), its project is resolved, and each rendered
object must be permitted by that project - and the project must permit nothing that no rendered object uses.

The permission rules are Argo CD's (AppProject spec, `IsGroupKindNamePermitted` / `IsDestinationPermitted`):
a namespaced object needs its namespace among the project's destinations and its group/kind in
namespaceResourceWhitelist (an absent whitelist allows every namespaced kind); a cluster-scoped object needs a
clusterResourceWhitelist entry matching group, kind and (when given) name (an empty whitelist denies all);
group, kind and name are globs. A sync with CreateNamespace=true creates the destination Namespace, which Argo CD
checks against clusterResourceWhitelist too (argo-cd#22869)."""

from __future__ import annotations

import copy
import fnmatch
import subprocess
from pathlib import Path

import celpy
import pytest
import yaml

from k8s_validate import tool

REPO = Path(__file__).resolve().parents[1]
ARGO = REPO / "manifests" / "argocd"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO_URL = "https://github.com/dolly-train/dolly-train"
# Sources outside this repository, as pinned by the Applications, and where their rendering is kept.
EXTERNAL = {
    ("https://ray-project.github.io/kuberay-helm/", "kuberay-operator", "1.7.0"): FIXTURES / "kuberay-operator-1.7.0",
    ("https://github.com/ray-project/kuberay", "ray-operator/config/crd", "v1.7.0"): FIXTURES / "kuberay-crds-1.7.0.yaml",
}
ROOT_PROJECT, WORKLOAD_PROJECT, PLATFORM_PROJECT = "dolly-train-root", "dolly-train", "dolly-train-platform"
# Scope of every kind these Applications may render. A kind missing here fails the test: classify it deliberately.
CLUSTER_SCOPED = {("", "Namespace"), ("apiextensions.k8s.io", "CustomResourceDefinition"),
                  ("rbac.authorization.k8s.io", "ClusterRole"), ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
                  ("admissionregistration.k8s.io", "ValidatingWebhookConfiguration"),
                  ("admissionregistration.k8s.io", "MutatingWebhookConfiguration"),
                  ("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
                  ("admissionregistration.k8s.io", "ValidatingAdmissionPolicyBinding"),
                  ("scheduling.k8s.io", "PriorityClass"), ("storage.k8s.io", "StorageClass"), ("", "PersistentVolume"),
                  ("kueue.x-k8s.io", "ClusterQueue"), ("kueue.x-k8s.io", "ResourceFlavor")}
NAMESPACED = {("", "ConfigMap"), ("", "Secret"), ("", "Service"), ("", "ServiceAccount"), ("", "PersistentVolumeClaim"),
              ("apps", "Deployment"), ("batch", "Job"), ("networking.k8s.io", "NetworkPolicy"),
              ("rbac.authorization.k8s.io", "Role"), ("rbac.authorization.k8s.io", "RoleBinding"),
              ("ray.io", "RayJob"), ("ray.io", "RayCluster"), ("argoproj.io", "Application"),
              ("monitoring.coreos.com", "ServiceMonitor"), ("kueue.x-k8s.io", "LocalQueue")}


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def group_kind(obj: dict) -> tuple[str, str]:
    api = obj["apiVersion"]
    return (api.split("/")[0] if "/" in api else "", obj["kind"])


def cluster_scoped(obj: dict) -> bool:
    gk = group_kind(obj)
    assert gk in CLUSTER_SCOPED | NAMESPACED, f"{gk}: unknown scope; add it to CLUSTER_SCOPED or NAMESPACED"
    return gk in CLUSTER_SCOPED


def projects() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for p in sorted((ARGO / "projects").glob("*.yaml")) for d in _docs(p.read_text())}


def sources(app: dict) -> list[dict]:
    return app["spec"].get("sources") or [app["spec"]["source"]]


# ---- rendering, as Argo CD does it --------------------------------------------------------------------------

def _helm(chart_dir: Path, release: str, namespace: str, value_files: list[Path] = (), values: dict | None = None,
          tmp: Path | None = None) -> list[dict]:
    args = [tool("helm"), "template", release, str(chart_dir), "--namespace", namespace, "--kube-version", "1.33.0"]
    for vf in value_files:
        args += ["-f", str(vf)]
    if values:
        vf = tmp / f"{release}-values.yaml"
        vf.write_text(yaml.safe_dump(values))
        args += ["-f", str(vf)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return _docs(res.stdout)


def render_source(app: dict, src: dict, ref_roots: dict[str, Path], tmp: Path) -> list[dict]:
    """The objects one source of an Application renders (Argo CD: helm chart, kustomize or plain directory)."""
    ns = app["spec"]["destination"]["namespace"]
    if src.get("ref"):
        return []  # only a `$name` reference for value files
    if src["repoURL"] != REPO_URL:
        key = (src["repoURL"], src.get("chart") or src.get("path"), src["targetRevision"])
        assert key in EXTERNAL, f"{app['metadata']['name']}: no rendering of {key} in tests/fixtures"
        fixture = EXTERNAL[key]
        if src.get("chart"):
            helm = src.get("helm") or {}
            assert helm.get("skipCrds") is True  # the fixture holds no crds/
            return _helm(fixture, helm.get("releaseName") or app["metadata"]["name"], ns,
                         values=helm.get("valuesObject"), tmp=tmp)
        objs = _docs(fixture.read_text())
        for o in objs:  # kustomize's commonAnnotations
            o["metadata"].setdefault("annotations", {}).update((src.get("kustomize") or {}).get("commonAnnotations") or {})
        return objs
    path = REPO / src["path"]
    if (path / "Chart.yaml").is_file():
        helm = src.get("helm") or {}
        files = []
        for vf in helm.get("valueFiles") or []:
            if vf.startswith("$"):
                ref, rest = vf[1:].split("/", 1)
                files.append(ref_roots[ref] / rest)
            else:
                files.append(path / vf)
        # helm.namespace: the namespace to template with (Argo CD: "If left empty, defaults to the app's destination
        # namespace"); objects still land in the destination.
        return _helm(path, helm.get("releaseName") or app["metadata"]["name"], helm.get("namespace") or ns, files,
                     helm.get("valuesObject"), tmp)
    if (path / "kustomization.yaml").is_file():
        res = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return _docs(res.stdout)
    include = (src.get("directory") or {}).get("include") or "*.yaml"
    return [d for p in sorted(path.iterdir()) if p.is_file() and fnmatch.fnmatch(p.name, include)
            for d in _docs(p.read_text())]


def render_app(app: dict, tmp: Path) -> list[dict]:
    """Every object the Application syncs, each with the namespace Argo CD applies it in (None: cluster-scoped)."""
    refs = {s["ref"]: REPO for s in sources(app) if s.get("ref") and s["repoURL"] == REPO_URL}
    objs = [o for s in sources(app) for o in render_source(app, s, refs, tmp)]
    ns = app["spec"]["destination"]["namespace"]
    for o in objs:
        if not cluster_scoped(o):
            o["metadata"].setdefault("namespace", ns)  # Argo CD puts namespace-less objects into the destination
    if "CreateNamespace=true" in ((app["spec"].get("syncPolicy") or {}).get("syncOptions") or []):
        objs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return objs


# ---- Argo CD's permission rules -----------------------------------------------------------------------------

def _match(entry: dict, group: str, kind: str, name: str | None = None) -> bool:
    return (fnmatch.fnmatchcase(group, entry["group"]) and fnmatch.fnmatchcase(kind, entry["kind"])
            and (name is None or "name" not in entry or fnmatch.fnmatchcase(name, entry["name"])))


def destination_permitted(project: dict, namespace: str, server: str = "https://kubernetes.default.svc") -> bool:
    return any(fnmatch.fnmatchcase(namespace, d.get("namespace", "")) and fnmatch.fnmatchcase(server, d.get("server", "*"))
               for d in project["spec"].get("destinations") or [])


def permitted(project: dict, obj: dict) -> str | None:
    """None when the project lets an Application sync obj, else why not."""
    spec = project["spec"]
    (group, kind), name = group_kind(obj), obj["metadata"]["name"]
    what = f"{kind}/{name}"
    if cluster_scoped(obj):
        if not any(_match(e, group, kind, name) for e in spec.get("clusterResourceWhitelist") or []):
            return f"{what}: cluster-scoped {group or 'core'}/{kind} not in clusterResourceWhitelist"
        if any(_match(e, group, kind, name) for e in spec.get("clusterResourceBlacklist") or []):
            return f"{what}: in clusterResourceBlacklist"
        return None
    if not destination_permitted(project, obj["metadata"]["namespace"]):
        return f"{what}: namespace {obj['metadata']['namespace']} is not a destination of the project"
    white = spec.get("namespaceResourceWhitelist")
    if white is not None and not any(_match(e, group, kind) for e in white):
        return f"{what}: {group or 'core'}/{kind} not in namespaceResourceWhitelist"
    if any(_match(e, group, kind) for e in spec.get("namespaceResourceBlacklist") or []):
        return f"{what}: in namespaceResourceBlacklist"
    return None


def project_problems(project: dict, apps: list[dict], rendered: dict[str, list[dict]]) -> list[str]:
    """Everything wrong between a project and the Applications that use it: an object, destination or repo it does
    not permit, and any permission (whitelist entry, destination, repo) that nothing rendered uses."""
    name, spec = project["metadata"]["name"], project["spec"]
    out = []
    objs = [o for a in apps for o in rendered[a["metadata"]["name"]]]
    for a in apps:
        if not destination_permitted(project, a["spec"]["destination"]["namespace"], a["spec"]["destination"]["server"]):
            out.append(f"{name}: Application {a['metadata']['name']}'s destination is not permitted")
        out += [f"{name}: Application {a['metadata']['name']} source {s['repoURL']} not in sourceRepos"
                for s in sources(a) if s["repoURL"] not in spec.get("sourceRepos", [])]
        out += [f"{name}: Application {a['metadata']['name']}: {why}"
                for o in rendered[a["metadata"]["name"]] if (why := permitted(project, o))]
    # Nothing else: every permission names one group and kind, and is used.
    for field in ("clusterResourceWhitelist", "namespaceResourceWhitelist"):
        out += [f"{name}: {field} entry {e} is a wildcard over groups or kinds" for e in spec.get(field) or []
                if any(c in e["group"] + e["kind"] for c in "*?[")]
    for e in spec.get("clusterResourceWhitelist") or []:
        if not any(cluster_scoped(o) and _match(e, *group_kind(o), o["metadata"]["name"]) for o in objs):
            out.append(f"{name}: clusterResourceWhitelist entry {e} matches nothing rendered")
    if spec.get("namespaceResourceWhitelist") is None:
        out.append(f"{name}: no namespaceResourceWhitelist, so every namespaced kind is allowed")
    for e in spec.get("namespaceResourceWhitelist") or []:
        if not any(not cluster_scoped(o) and _match(e, *group_kind(o)) for o in objs):
            out.append(f"{name}: namespaceResourceWhitelist entry {e} matches nothing rendered")
    used_ns = {o["metadata"]["namespace"] for o in objs if not cluster_scoped(o)} | {
        a["spec"]["destination"]["namespace"] for a in apps}
    for d in spec.get("destinations") or []:
        if not any(fnmatch.fnmatchcase(n, d.get("namespace", "")) for n in used_ns) or "*" in d.get("namespace", ""):
            out.append(f"{name}: destination {d} is wider than what its Applications use ({sorted(used_ns)})")
    for repo in spec.get("sourceRepos") or []:
        if not any(s["repoURL"] == repo for a in apps for s in sources(a)):
            out.append(f"{name}: sourceRepos entry {repo} is used by no Application")
    return out


# ---- the tests -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(projects, Applications: root first then its children as rendered from Git, rendered objects by app)."""
    tmp = tmp_path_factory.mktemp("argo")
    root = _docs((ARGO / "root.yaml").read_text())[0]
    children = render_app(root, tmp)
    apps = [root] + [c for c in children if c["kind"] == "Application"]
    rendered = {root["metadata"]["name"]: children}
    rendered.update({a["metadata"]["name"]: render_app(a, tmp) for a in apps[1:]})
    return projects(), apps, rendered


def all_problems(projs: dict, apps: list[dict], rendered: dict) -> list[str]:
    out = [f"Application {a['metadata']['name']}: project {a['spec']['project']} does not exist"
           for a in apps if a["spec"]["project"] not in projs]
    for name, proj in projs.items():
        out += project_problems(proj, [a for a in apps if a["spec"]["project"] == name], rendered)
    # Only the root app creates Applications, and only of the workload and platform projects.
    root, children = apps[0], apps[1:]
    out += [f"{c['metadata']['name']}: a child Application of project {c['spec']['project']}" for c in children
            if c["spec"]["project"] not in (WORKLOAD_PROJECT, PLATFORM_PROJECT)]
    out += [f"{c['metadata']['name']}: shares the root app's project {c['spec']['project']}, which may create Applications"
            for c in children if c["spec"]["project"] == root["spec"]["project"]]
    for name, proj in projs.items():
        makes_apps = any(_match(e, "argoproj.io", "Application") for e in proj["spec"].get("namespaceResourceWhitelist") or [{"group": "*", "kind": "*"}])
        if name != root["spec"]["project"] and (destination_permitted(proj, "argocd") or makes_apps):
            out.append(f"{name}: may create Applications or other objects in argocd; only {root['spec']['project']} may")
    return out


def test_every_rendered_object_is_permitted_by_its_project_and_nothing_else_is(tree):
    projs, apps, rendered = tree
    assert set(projs) == {ROOT_PROJECT, WORKLOAD_PROJECT, PLATFORM_PROJECT}
    assert {a["metadata"]["name"]: a["spec"]["project"] for a in apps} == {
        "dolly-train-root": ROOT_PROJECT, "kuberay-crds": PLATFORM_PROJECT, "kuberay-operator": PLATFORM_PROJECT,
        "dolly-train-namespace": PLATFORM_PROJECT, "dolly-train-progress-policy": PLATFORM_PROJECT,
        "dolly-train-storage": WORKLOAD_PROJECT, "dolly-train": WORKLOAD_PROJECT}
    # The renders are real: the chart's RayJob and staging Job, the operator's ClusterRole, the four CRDs.
    kinds = {a: {o["kind"] for o in objs} for a, objs in rendered.items()}
    assert {"RayJob", "Job", "ConfigMap", "NetworkPolicy", "Role"} <= kinds["dolly-train"]
    assert {"Deployment", "ClusterRole", "ClusterRoleBinding"} <= kinds["kuberay-operator"]
    assert kinds["kuberay-crds"] == {"CustomResourceDefinition"} and len(rendered["kuberay-crds"]) == 4
    assert all_problems(projs, apps, rendered) == []


def test_the_workload_project_allows_no_cluster_scoped_kind_and_only_its_namespace(tree):
    projs, apps, rendered = tree
    w = projs[WORKLOAD_PROJECT]["spec"]
    assert w["clusterResourceWhitelist"] == [] and not w.get("clusterResourceBlacklist")
    assert [d["namespace"] for d in w["destinations"]] == ["dolly-train"]
    assert all("*" not in e["group"] + e["kind"] for e in w["namespaceResourceWhitelist"])
    for a in apps:
        if a["spec"]["project"] == WORKLOAD_PROJECT:
            assert not any(cluster_scoped(o) for o in rendered[a["metadata"]["name"]]), a["metadata"]["name"]
    # Every cluster-scoped object of the whole setup comes from the platform project.
    owners = {a["spec"]["project"] for a in apps for o in rendered[a["metadata"]["name"]] if cluster_scoped(o)}
    assert owners == {PLATFORM_PROJECT}


def test_the_checks_fail_on_the_old_single_project_and_on_widened_projects(tree):
    """The project before the split (one project for everything: ClusterRole/ClusterRoleBinding for every app,
    `argocd` a destination, no namespaceResourceWhitelist) must fail, and so must each single widening."""
    projs, apps, rendered = tree
    old = {"apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject", "metadata": {"name": "dolly-train"}, "spec": {
        "sourceRepos": [REPO_URL, "https://ray-project.github.io/kuberay-helm/", "https://github.com/ray-project/kuberay"],
        "destinations": [{"server": "https://kubernetes.default.svc", "namespace": n}
                         for n in ("argocd", "kuberay-system", "dolly-train")],
        "clusterResourceWhitelist": [{"group": "", "kind": "Namespace"},
                                     {"group": "apiextensions.k8s.io", "kind": "CustomResourceDefinition"},
                                     {"group": "rbac.authorization.k8s.io", "kind": "ClusterRole"},
                                     {"group": "rbac.authorization.k8s.io", "kind": "ClusterRoleBinding"},
                                     {"group": "admissionregistration.k8s.io", "kind": "ValidatingWebhookConfiguration"},
                                     {"group": "admissionregistration.k8s.io", "kind": "MutatingWebhookConfiguration"}]}}
    one = [copy.deepcopy(a) for a in apps]
    for a in one:
        a["spec"]["project"] = "dolly-train"
    problems = all_problems({"dolly-train": old}, one, rendered)
    assert any("no namespaceResourceWhitelist" in p for p in problems)
    assert any("ValidatingWebhookConfiguration" in p and "matches nothing" in p for p in problems)
    assert any("shares the root app's project" in p for p in problems)

    def widened(project: str, change) -> list[str]:
        p = copy.deepcopy(projs)
        change(p[project]["spec"])
        return all_problems(p, apps, rendered)

    assert widened(WORKLOAD_PROJECT, lambda s: s["clusterResourceWhitelist"].append(
        {"group": "rbac.authorization.k8s.io", "kind": "ClusterRoleBinding"}))
    assert widened(WORKLOAD_PROJECT, lambda s: s["destinations"].append(
        {"server": "https://kubernetes.default.svc", "namespace": "argocd"}))
    assert widened(WORKLOAD_PROJECT, lambda s: s["namespaceResourceWhitelist"].append({"group": "apps", "kind": "Deployment"}))
    assert widened(WORKLOAD_PROJECT, lambda s: s.pop("namespaceResourceWhitelist"))
    assert widened(PLATFORM_PROJECT, lambda s: s["clusterResourceWhitelist"].append({"group": "*", "kind": "*"}))
    # And narrowing breaks a real object: the RayJob without ray.io/RayJob, the operator without its ClusterRole.
    assert any("RayJob/dolly-train" in p for p in widened(WORKLOAD_PROJECT, lambda s: s["namespaceResourceWhitelist"].remove(
        {"group": "ray.io", "kind": "RayJob"})))
    assert any("ClusterRole/kuberay-operator" in p for p in widened(PLATFORM_PROJECT, lambda s: s["clusterResourceWhitelist"].remove(
        {"group": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kuberay-operator"})))


def test_a_child_application_naming_another_project_is_caught(tree):
    projs, apps, rendered = tree
    for project in (ROOT_PROJECT, "default"):
        bad = copy.deepcopy(apps)
        bad[-1]["spec"]["project"] = project
        assert any(bad[-1]["metadata"]["name"] in p for p in all_problems(projs, bad, rendered)), project


def test_a_cluster_scoped_policy_object_in_the_chart_is_rejected_for_the_workload(tree):
    """A ValidatingAdmissionPolicy (cluster-scoped) rendered by the chart under the workload project fails: such an
    object must come from the platform project (manifests/argocd/platform/) or stay off under Argo CD."""
    projs, apps, rendered = tree
    extra = dict(rendered)
    vap = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
           "metadata": {"name": "dolly-train-progress"}}
    extra["dolly-train"] = rendered["dolly-train"] + [vap]
    assert any("ValidatingAdmissionPolicy" in p for p in all_problems(projs, apps, extra))


POLICY_KINDS = [("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
                ("admissionregistration.k8s.io", "ValidatingAdmissionPolicyBinding")]


def test_the_progress_policy_comes_from_the_platform_project_as_the_workloads_chart_renders_it(tree, tmp_path):
    """The chart's progress admission policy is cluster-scoped: the workload Application renders it off, and the
    platform project's dolly-train-progress-policy renders exactly it - the two objects the workload Application's
    own rendering holds with the policy switched on (so no copy can drift), naming the service account the
    workload's RayJob workers run as and the workload's namespace - and the platform project allows those two
    objects by name, nothing wider."""
    projs, apps, rendered = tree
    by_name = {a["metadata"]["name"]: a for a in apps}
    workload, policy_app = by_name["dolly-train"], by_name["dolly-train-progress-policy"]
    assert policy_app["spec"]["project"] == PLATFORM_PROJECT
    got = rendered["dolly-train-progress-policy"]
    assert sorted(group_kind(o) for o in got) == POLICY_KINDS
    assert not any(group_kind(o) in POLICY_KINDS for o in rendered["dolly-train"])

    # The oracle: the workload Application itself, rendered with the policy on (one release, as `helm install`).
    one_release = copy.deepcopy(workload)
    chart = next(s for s in sources(one_release) if s.get("path") == "charts/dolly-train")
    assert "valuesObject" not in chart["helm"]
    chart["helm"]["valuesObject"] = {"progress": {"admissionPolicy": True}}
    whole = render_app(one_release, tmp_path)
    expected = [o for o in whole if group_kind(o) in POLICY_KINDS]
    key = lambda o: o["kind"]  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)
    # Only the policy moved: the rest of that rendering is what the workload Application renders.
    assert [o for o in whole if group_kind(o) not in POLICY_KINDS] == rendered["dolly-train"]

    # Independently of the chart's helpers: the policy matches the account the workers run as, in the namespace the
    # workload lands in, and only there; its scope is the RayJobs of that namespace and nothing else.
    ns = workload["spec"]["destination"]["namespace"]
    rayjob = next(o for o in rendered["dolly-train"] if o["kind"] == "RayJob")
    (sa,) = {g["template"]["spec"]["serviceAccountName"] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert any(o["kind"] == "ServiceAccount" and o["metadata"]["name"] == sa and o["metadata"]["namespace"] == ns
               for o in rendered["dolly-train"])
    policy = next(o for o in got if o["kind"] == "ValidatingAdmissionPolicy")
    binding = next(o for o in got if o["kind"] == "ValidatingAdmissionPolicyBinding")
    env = celpy.Environment()

    def matches(username: str) -> bool:
        act = {"request": celpy.json_to_cel({"userInfo": {"username": username}})}
        return all(env.program(env.compile(c["expression"])).evaluate(act) for c in policy["spec"]["matchConditions"])

    assert matches(f"system:serviceaccount:{ns}:{sa}")
    assert not matches(f"system:serviceaccount:kuberay-system:{sa}") and not matches(f"system:serviceaccount:{ns}:default")
    assert {(g, r) for rule in policy["spec"]["matchConstraints"]["resourceRules"]
            for g in rule["apiGroups"] for r in rule["resources"]} == {("ray.io", "rayjobs")}
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}

    # The platform project: exactly these two objects, each by its exact name (no glob).
    entries = [e for e in projs[PLATFORM_PROJECT]["spec"]["clusterResourceWhitelist"]
               if e["group"] == "admissionregistration.k8s.io"]
    assert sorted((e["group"], e["kind"], e.get("name")) for e in entries) == sorted(
        (*group_kind(o), o["metadata"]["name"]) for o in got)
    # And it is in place before the workload's RayJob can start a trainer.
    wave = lambda a: int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])  # noqa: E731
    assert wave(policy_app) < wave(workload)


def test_the_policy_app_breaks_when_its_rendering_leaves_the_workloads(tree, tmp_path):
    """The checks above are not vacuous: a policy app templating another namespace or release names another account
    and other objects, which the platform project refuses (its entries are by name) - so a drift fails review."""
    projs, apps, rendered = tree
    for field, value in (("namespace", "kuberay-system"), ("releaseName", "dolly-train-policy")):
        bad_apps = copy.deepcopy(apps)
        app = next(a for a in bad_apps if a["metadata"]["name"] == "dolly-train-progress-policy")
        next(s for s in sources(app) if s.get("path") == "charts/dolly-train")["helm"][field] = value
        bad = dict(rendered, **{"dolly-train-progress-policy": render_app(app, tmp_path)})
        problems = all_problems(projs, bad_apps, bad)
        assert any("ValidatingAdmissionPolicy/" in p and "not in clusterResourceWhitelist" in p for p in problems), field

