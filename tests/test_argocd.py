"""GitOps manifests (manifests/argocd): the Argo CD objects against Argo CD's own CRDs (../shared/crds/argo-cd),
the argocd-cm that kustomize generates from the health.lua files (and nothing else: no Argo CD-wide setting), the
KubeRay CRDs that no prune or delete can remove, sync-wave order from the CRDs to the eval Job, and what the dolly-train Application renders with its values file (helm template,
validated against Kubernetes and KubeRay v1.7.0 schemas)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from k8s_validate import load_crds, tool, validate_objects, validate_pod_templates

REPO = Path(__file__).resolve().parents[1]
ARGO = REPO / "manifests" / "argocd"
REPO_URL = "https://github.com/dolly-train/dolly-train"
KUBERAY_VERSION = "1.7.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def argo_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in [*sorted((ARGO / "projects").glob("*.yaml")), ARGO / "root.yaml",
                             *sorted((ARGO / "apps").glob("*.yaml")), *sorted((ARGO / "platform").glob("*.yaml"))]
            for d in _docs(p)]


def apps() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in argo_objects() if d["kind"] == "Application"}


def wave(obj: dict) -> int:
    return int((obj["metadata"].get("annotations") or {}).get("argocd.argoproj.io/sync-wave", "0"))


def sources(app: dict) -> list[dict]:
    return app["spec"].get("sources") or [app["spec"]["source"]]


@pytest.fixture(scope="module")
def argo_crds(shared_dir):
    return load_crds(shared_dir / "crds" / "argo-cd")


@pytest.fixture(scope="module")
def kuberay_crds(shared_dir):
    return load_crds(shared_dir / "crds" / f"kuberay-v{KUBERAY_VERSION}")


def test_argo_objects_validate_against_argo_cd_crds(argo_crds):
    objs = [d for _, d in argo_objects()]
    assert {d["kind"] for d in objs} == {"Application", "AppProject", "Namespace"}
    objs = [d for d in objs if d["kind"] != "Namespace"]  # platform/: a built-in kind, validated below
    # The Application health check's testdata are whole Applications too (with status).
    objs += [yaml.safe_load(p.read_text()) for p in (ARGO / "resource_customizations/argoproj.io/Application/testdata").glob("*.yaml")]
    assert validate_objects(objs, argo_crds) == []


def test_validation_catches_a_misspelled_field(argo_crds):
    app = apps()["dolly-train"]
    bad = yaml.safe_load(yaml.safe_dump(app))
    bad["spec"]["syncPolicy"]["syncOption"] = bad["spec"]["syncPolicy"].pop("syncOptions")
    assert any("syncOption" in e for e in validate_objects([bad], argo_crds))


def test_sync_waves_operator_then_volume_then_dolly_train():
    a = apps()
    assert set(a) == {"dolly-train-root", "kuberay-crds", "kuberay-operator", "dolly-train-namespace",
                      "dolly-train-progress-policy", "dolly-train-storage", "dolly-train"}
    assert wave(a["kuberay-crds"]) < wave(a["kuberay-operator"]) < wave(a["dolly-train-storage"]) < wave(a["dolly-train"])
    # The namespace exists before the volume and the chart (neither project of theirs may create it).
    assert wave(a["dolly-train-namespace"]) < wave(a["dolly-train-storage"])
    # The progress admission policy: after the RayJob CRD its CEL is type-checked against, before the RayJob.
    assert wave(a["kuberay-crds"]) < wave(a["dolly-train-progress-policy"]) < wave(a["dolly-train"])
    (ns,) = [d for _, d in argo_objects() if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == a["dolly-train"]["spec"]["destination"]["namespace"]
    assert set(ns["metadata"]["annotations"]["argocd.argoproj.io/sync-options"].split(",")) == {"Prune=false", "Delete=false"}
    assert "resources-finalizer.argocd.argoproj.io" not in (a["dolly-train-namespace"]["metadata"].get("finalizers") or [])
    assert validate_objects([ns]) == []
    root = a["dolly-train-root"]["spec"]["source"]
    assert root["path"] == "manifests/argocd/apps" and (REPO / root["path"]).is_dir()


def test_kuberay_operator_application():
    app = apps()["kuberay-operator"]
    src = app["spec"]["source"]
    assert (src["repoURL"], src["chart"], src["targetRevision"]) == (
        "https://ray-project.github.io/kuberay-helm/", "kuberay-operator", KUBERAY_VERSION)
    opts = app["spec"]["syncPolicy"]["syncOptions"]
    assert "ServerSideApply=true" in opts
    assert app["spec"]["syncPolicy"]["automated"]["prune"] is False
    # The CRDs are not this Application's: deleting it (its finalizer cascades) must leave every RayJob alone.
    assert src["helm"]["skipCrds"] is True
    gates = {g["name"]: g["enabled"] for g in src["helm"]["valuesObject"]["featureGates"]}
    assert gates["RayClusterStatusConditions"] is True  # the RayCluster health check reads status.conditions


def test_kuberay_crds_are_never_pruned_or_deleted_by_argo_cd():
    """Removing an app file (the root app prunes) or deleting an Application must not delete the CRDs, which would
    delete every RayJob and RayCluster in the cluster: they come from their own Application, without a cascading
    finalizer, each CRD annotated Prune=false,Delete=false."""
    a = apps()
    crds = a["kuberay-crds"]
    src = crds["spec"]["source"]
    assert (src["repoURL"], src["targetRevision"], src["path"]) == (
        "https://github.com/ray-project/kuberay", f"v{KUBERAY_VERSION}", "ray-operator/config/crd")
    options = src["kustomize"]["commonAnnotations"]["argocd.argoproj.io/sync-options"]
    assert set(options.split(",")) == {"Prune=false", "Delete=false"}
    assert "resources-finalizer.argocd.argoproj.io" not in (crds["metadata"].get("finalizers") or [])
    assert crds["spec"]["syncPolicy"]["automated"]["prune"] is False
    assert "ServerSideApply=true" in crds["spec"]["syncPolicy"]["syncOptions"]
    # The operator's chart version and the CRDs' tag move together.
    assert a["kuberay-operator"]["spec"]["source"]["targetRevision"] == KUBERAY_VERSION
    project = next(d for _, d in argo_objects() if d["kind"] == "AppProject"
                   and d["metadata"]["name"] == crds["spec"]["project"])
    assert src["repoURL"] in project["spec"]["sourceRepos"]
    # Every Application that can cascade a delete holds no CRD: only kuberay-crds renders CRDs.
    for name, app in a.items():
        if name != "kuberay-crds" and "resources-finalizer.argocd.argoproj.io" in (app["metadata"].get("finalizers") or []):
            assert all("crd" not in (s.get("path") or "") for s in sources(app)), name
            assert all((s.get("helm") or {}).get("skipCrds", True) for s in sources(app) if s.get("chart")), name


def test_a_sync_does_not_rerun_a_finished_training_or_eval():
    """Self-heal and every later sync apply the same objects again: the finished RayJob must stay (KubeRay never
    restarts a Complete/Failed RayJob), and the eval must not be a hook (hooks are re-created on every sync) nor a
    Job that deletes itself (a sync would re-create it)."""
    app = apps()["dolly-train"]
    chart = next(s for s in sources(app) if s.get("path") == "charts/dolly-train")
    objs = _render_dolly_train(chart, app)
    (rayjob,) = [o for o in objs if o["kind"] == "RayJob"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True and "deletionStrategy" not in rayjob["spec"]
    evals = next(s for s in sources(app) if s.get("directory"))
    (path,) = [REPO / evals["path"] / evals["directory"]["include"]]
    job = next(d for d in _docs(path) if d["kind"] == "Job")
    ann = job["metadata"].get("annotations") or {}
    assert "argocd.argoproj.io/hook" not in ann and "helm.sh/hook" not in ann
    assert int(ann["argocd.argoproj.io/sync-wave"]) == wave(rayjob)  # test_a_sync_ends_while_the_model_trains
    assert "ttlSecondsAfterFinished" not in job["spec"]
    assert job["spec"]["backoffLimit"] <= 1


def test_kuberay_crds_are_too_big_for_client_side_apply(shared_dir):
    """Why ServerSideApply: client-side apply stores the whole object in an annotation capped at 256 KiB."""
    import json

    limit = 262144
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        crd = yaml.load((shared_dir / "crds" / f"kuberay-v{KUBERAY_VERSION}" / name).read_text(), Loader=yaml.CSafeLoader)
        assert len(json.dumps(crd, separators=(",", ":"))) > limit, name


def test_dolly_train_application_sources_exist():
    app = apps()["dolly-train"]
    srcs = sources(app)
    chart = next(s for s in srcs if s.get("path") == "charts/dolly-train")
    ref = next(s for s in srcs if s.get("ref"))
    for s in srcs:
        assert s["repoURL"] == REPO_URL and s["targetRevision"] == "main"
        if "path" in s:
            assert (REPO / s["path"]).is_dir(), s["path"]
    for vf in chart["helm"]["valueFiles"]:
        path = REPO / vf.replace(f"${ref['ref']}/", "") if vf.startswith("$") else REPO / chart["path"] / vf
        assert path.is_file(), vf
    projects = {d["metadata"]["name"]: d for _, d in argo_objects() if d["kind"] == "AppProject"}
    for a in apps().values():  # tests/test_argocd_projects.py checks every rendered object against its project
        project = projects[a["spec"]["project"]]
        assert a["spec"]["destination"]["namespace"] in {d["namespace"] for d in project["spec"]["destinations"]}
        assert all(s["repoURL"] in project["spec"]["sourceRepos"] for s in sources(a))


def test_ignore_differences_cover_what_kuberay_and_users_change_and_are_explained():
    app = apps()["dolly-train"]
    rules = {(r["kind"], p) for r in app["spec"]["ignoreDifferences"]
             for p in r.get("jsonPointers", []) + r.get("jqPathExpressions", [])}
    assert ("RayJob", "/spec/suspend") in rules
    assert ("RayCluster", ".spec.workerGroupSpecs[].replicas") in rules
    assert "RespectIgnoreDifferences=true" in app["spec"]["syncPolicy"]["syncOptions"]
    # Each rule is preceded by a comment saying why.
    text = (ARGO / "apps" / "dolly-train.yaml").read_text()
    block = text.split("ignoreDifferences:")[1].split("syncPolicy:")[0]
    for entry in re.split(r"\n(?=    - group:)", block)[1:]:
        prev = block[:block.index(entry)].rstrip().splitlines()[-1].strip()
        assert prev.startswith("#"), f"ignoreDifferences entry without a comment: {entry.splitlines()[0]}"


def test_argocd_cm_is_generated_from_the_lua_files():
    res = subprocess.run([tool("kubectl"), "kustomize", str(ARGO)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    objs = [d for d in yaml.safe_load_all(res.stdout) if d]
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert cm["metadata"]["name"] == "argocd-cm" and cm["metadata"]["namespace"] == "argocd"
    assert cm["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"
    lua = {f"resource.customizations.health.{p.parent.parent.name}_{p.parent.name}": p.read_text()
           for p in (ARGO / "resource_customizations").glob("*/*/health.lua")}
    assert {"resource.customizations.health.ray.io_RayJob", "resource.customizations.health.ray.io_RayCluster"} <= set(lua)
    health = {k: v for k, v in cm["data"].items() if k.startswith("resource.customizations.health.")}
    assert health == lua
    # Only health checks: no Argo CD-wide setting (e.g. kustomize.buildOptions with a loosened load restrictor)
    # changes for the other applications on that Argo CD.
    assert set(cm["data"]) == set(health)
    assert {(o["kind"], o["metadata"]["name"]) for o in objs} == {
        ("ConfigMap", "argocd-cm"), ("AppProject", "dolly-train"), ("AppProject", "dolly-train-platform"),
        ("AppProject", "dolly-train-root"), ("Application", "dolly-train-root"),
        ("ValidatingAdmissionPolicy", "dolly-train-root-children"),
        ("ValidatingAdmissionPolicyBinding", "dolly-train-root-children")}


def test_every_kustomization_builds_with_the_default_load_restrictor():
    """What Argo CD builds with its defaults must build here with kubectl's (LoadRestrictionsRootOnly)."""
    for k in sorted(ARGO.rglob("kustomization.yaml")):
        res = subprocess.run([tool("kubectl"), "kustomize", str(k.parent)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{k}: {res.stderr}"


def test_eval_job_runs_after_the_rayjob_on_the_shared_volume():
    app = apps()["dolly-train"]
    evals = next(s for s in sources(app) if s.get("directory"))
    assert evals["repoURL"] == REPO_URL and (REPO / evals["path"] / evals["directory"]["include"]).is_file()
    objs = _docs(REPO / evals["path"] / evals["directory"]["include"])
    job = next(o for o in objs if o["kind"] == "Job")
    assert wave(job) == 0 == wave(next(o for o in objs if o["kind"] == "ConfigMap"))
    claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    pvc = _docs(ARGO / "storage" / "pvc.yaml")[0]
    assert claims == {pvc["metadata"]["name"]}
    # No namespace in the file: Argo CD puts it into the Application's destination, where the claim is.
    assert all("namespace" not in o["metadata"] for o in objs) and pvc["metadata"]["namespace"] == app["spec"]["destination"]["namespace"]
    # Wait for the export, base and fine-tuned, then the comparison.
    spec = job["spec"]["template"]["spec"]
    assert [c["command"][1] for c in spec["initContainers"] + spec["containers"]] == ["wait-export", "run", "run", "compare"]


def test_a_sync_ends_while_the_model_trains():
    """Argo CD (gitops-engine's sync context) holds a multi-wave sync open until every object of a wave is Healthy
    before the next wave; objects of the last wave only need to apply ("if it is the last phase/wave and the only
    remaining tasks are non-hooks, then we are successful EVEN if those objects subsequently degraded"). So the
    RayJob, Progressing while it trains, must be in the last wave of its Application, and of the root app, and the
    eval Job is ordered after the training by its wait-export init container instead: created with the RayJob, it
    waits on the volume for the export, at least as long as the RayJob may run."""
    app = apps()["dolly-train"]
    chart = next(s for s in sources(app) if s.get("path") == "charts/dolly-train")
    objs = _render_dolly_train(chart, app)
    evals = next(s for s in sources(app) if s.get("directory"))
    objs += _docs(REPO / evals["path"] / evals["directory"]["include"])
    synced = [o for o in objs if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]
    (rayjob,) = [o for o in synced if o["kind"] == "RayJob"]
    assert max(wave(o) for o in synced) == wave(rayjob), "an object in a wave after the RayJob holds every sync open"
    root_children = apps()
    root_children.pop("dolly-train-root")
    assert max(wave(a) for a in root_children.values()) == wave(app)
    job = next(o for o in synced if o["kind"] == "Job")
    spec = job["spec"]["template"]["spec"]
    first = spec["initContainers"][0]
    cmd = first["command"]
    assert cmd[:2] == ["dolly-eval", "wait-export"]
    assert cmd[cmd.index("--model") + 1] == "$(MODEL_DIR)" and cmd[cmd.index("--run-dir") + 1] == "$(MOUNT)/runs/$(RUN_NAME)"
    timeout = int(cmd[cmd.index("--timeout") + 1])
    assert timeout >= rayjob["spec"]["activeDeadlineSeconds"]
    assert job["spec"]["activeDeadlineSeconds"] >= timeout + 3600  # and time for the evaluation after it
    # The wait itself needs no GPU; the pod holds its largest init container's GPU anyway (documented).
    assert "nvidia.com/gpu" not in first["resources"]["limits"]
    # The run the Job waits for is the one the chart trains and exports.
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "dolly-eval-params")
    train = yaml.safe_load(next(o for o in objs if o["kind"] == "ConfigMap" and "train.yaml" in o.get("data", {}))["data"]["train.yaml"])
    assert cm["data"]["MODEL_DIR"] == f"{train['checkpoint']['storage_path']}/{cm['data']['RUN_NAME']}/export"
    assert cm["data"]["RUN_NAME"] == train["checkpoint"]["run_name"] and train["checkpoint"]["export"] is True


def test_storage_pvc_survives_pruning_and_validates():
    pvc = _docs(ARGO / "storage" / "pvc.yaml")[0]
    assert set(pvc["metadata"]["annotations"]["argocd.argoproj.io/sync-options"].split(",")) == {"Prune=false", "Delete=false"}
    assert validate_objects([pvc]) == []


def test_chart_under_argo_values_orders_staging_config_rayjob(kuberay_crds):
    """What the dolly-train Application deploys: `helm template` with its value files. The chart's PVC hook is
    gone (the storage Application owns the claim), the staging Job is a Helm pre-install hook (Argo CD: PreSync),
    the ConfigMap precedes the RayJob by sync wave, and every object is valid."""
    app = apps()["dolly-train"]
    chart = next(s for s in sources(app) if s.get("path") == "charts/dolly-train")
    objs = _render_dolly_train(chart, app)
    kinds = {o["kind"]: o for o in objs}
    assert "PersistentVolumeClaim" not in kinds
    staging = next(o for o in objs if o["kind"] == "Job")
    assert "pre-install" in staging["metadata"]["annotations"]["helm.sh/hook"]
    # The gated model's token reaches the staging Job (the values file names the Secret), as a mounted file.
    vols = {v["name"]: v for v in staging["spec"]["template"]["spec"]["volumes"]}
    assert vols["hf-token"]["secret"]["secretName"] == "hf-token"
    # Token auth and the NetworkPolicy stay on under GitOps.
    assert kinds["RayJob"]["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    assert kinds["NetworkPolicy"]["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": apps()["kuberay-operator"]["spec"]["destination"]["namespace"]}
    rayjob, cm = kinds["RayJob"], kinds["ConfigMap"]
    assert wave(cm) < wave(rayjob)
    claims = {v["persistentVolumeClaim"]["claimName"] for _, t in [("", rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])]
              for v in t["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {_docs(ARGO / "storage" / "pvc.yaml")[0]["metadata"]["name"]}
    assert rayjob["spec"].get("suspend", False) is False
    errors = validate_objects(objs, kuberay_crds, k8s_version="1.33")
    errors += [e for o in objs if o["kind"] == "RayJob" for e in validate_pod_templates(o, "1.33")]
    assert errors == []


def _render_dolly_train(chart: dict, app: dict) -> list[dict]:
    """`helm template` of the chart the way the dolly-train Application renders it (its value files)."""
    args = [tool("helm"), "template", chart["helm"]["releaseName"], str(REPO / chart["path"]),
            "--namespace", app["spec"]["destination"]["namespace"], "--kube-version", "1.33.0"]
    for vf in chart["helm"]["valueFiles"]:
        args += ["-f", str(REPO / vf.replace("$values/", "")) if vf.startswith("$") else str(REPO / chart["path"] / vf)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]
