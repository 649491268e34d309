"""Argo CD health checks (manifests/argocd/resource_customizations/**/health.lua), run in a real Lua VM (lupa)
the way Argo CD's own resource_customizations test runs them: every health_test.yaml found, each case's
inputPath loaded as the global `obj`, the script's returned status and message compared exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

lupa = pytest.importorskip("lupa", reason="lupa (dev extra) runs the Lua health checks")

ROOT = Path(__file__).resolve().parents[1] / "manifests" / "argocd" / "resource_customizations"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def _cases():
    for test_file in sorted(ROOT.glob("*/*/health_test.yaml")):
        for case in yaml.safe_load(test_file.read_text())["tests"]:
            kind = f"{test_file.parent.parent.name}/{test_file.parent.name}"
            yield pytest.param(test_file.parent, case, id=f"{kind}:{case['inputPath']}")


def _to_lua(lua, value):
    # Argo CD hands the script the object decoded from JSON: maps become tables, lists 1-based arrays.
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def run_health(script_dir: Path, obj: dict) -> dict:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    result = lua.execute((script_dir / "health.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def test_every_customization_has_tests_and_uses_all_its_testdata():
    dirs = sorted(p.parent for p in ROOT.glob("*/*/health.lua"))
    assert {d.name for d in dirs} >= {"RayJob", "RayCluster"}
    for d in dirs:
        cases = yaml.safe_load((d / "health_test.yaml").read_text())["tests"]
        used = {c["inputPath"] for c in cases}
        present = {f"testdata/{p.name}" for p in (d / "testdata").glob("*.yaml")}
        assert used == present, f"{d}: testdata without a case {present - used}, cases without a file {used - present}"


@pytest.mark.parametrize(("script_dir", "case"), list(_cases()))
def test_health(script_dir: Path, case: dict):
    obj = yaml.safe_load((script_dir / case["inputPath"]).read_text())
    want = case["healthStatus"]
    assert want["status"] in ARGO_STATUSES
    assert run_health(script_dir, obj) == {"status": want["status"], "message": want.get("message", "")}


def test_testdata_are_valid_against_the_kuberay_crds(shared_dir):
    """The testdata are whole RayJob/RayCluster objects, status included, that KubeRay v1.7.0's CRDs accept
    (strictly: a misspelled status field is an error, see tests/k8s_validate.py)."""
    from k8s_validate import load_crds, validate_objects

    crds = load_crds(shared_dir / "crds" / "kuberay-v1.7.0")
    objs = [yaml.safe_load(p.read_text()) for kind in ("RayJob", "RayCluster")
            for p in sorted((ROOT / "ray.io" / kind / "testdata").glob("*.yaml"))]
    assert len(objs) > 20
    assert validate_objects(objs, crds) == []


def test_status_enums_used_are_kuberays():
    """Guard against typos: every jobStatus / jobDeploymentStatus the Lua compares against is one KubeRay
    v1.7.0 defines (ray-operator/apis/ray/v1/rayjob_types.go)."""
    import re

    job_statuses = {"PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"}
    deployment = {"Initializing", "Running", "Complete", "Failed", "ValidationFailed", "Suspending", "Suspended",
                  "Retrying", "Waiting"}
    src = (ROOT / "ray.io" / "RayJob" / "health.lua").read_text()
    compared = set(re.findall(r'(?:job|dep) == "([A-Za-z]+)"', src))
    assert compared and compared <= job_statuses | deployment, compared - (job_statuses | deployment)


def test_cli_wait_outcome_agrees_with_the_rayjob_health_check():
    """`dolly-train wait` (trainer/deploy/state.py) and Argo CD judge a RayJob the same way on every testdata case:
    Healthy = succeeded, Degraded = failed, Progressing/Suspended = still running - and Progressing "Queued in Kueue
    ..." = queued (waiting for Kueue's admission)."""
    from trainer.deploy.state import RayJobState

    expected = {"Healthy": "succeeded", "Degraded": "failed", "Progressing": "running", "Suspended": "running"}
    rayjob = ROOT / "ray.io" / "RayJob"
    queued = 0
    for path in sorted((rayjob / "testdata").glob("*.yaml")):
        obj = yaml.safe_load(path.read_text())
        health = run_health(rayjob, obj)
        want = expected[health["status"]]
        if health["status"] == "Progressing" and health["message"].startswith("Queued in Kueue LocalQueue "):
            want, queued = "queued", queued + 1
        assert RayJobState.from_object(obj).outcome == want, f"{path.name}: Argo CD says {health}"
    assert queued >= 4


# What KubeRay v1.7.0 and Kueue v0.19.2 write for a RayJob with kueue.queueName, in order: created suspended, KubeRay
# walks it to Suspended without a cluster (queued), Kueue admits it (spec.suspend false), KubeRay starts over and runs
# it, Kueue preempts it (suspended again), then it waits in the queue again. tests/test_k8s_client.py replays it
# through `dolly-train wait`.
KUEUE_SEQUENCE = ["kueue-created", "kueue-initializing", "kueue-suspending", "kueue-queued", "kueue-admitted",
                  "kueue-admitted-new", "kueue-running", "kueue-preempted", "kueue-queued"]


def test_a_queued_rayjob_is_never_degraded_or_suspended():
    from trainer.deploy.state import RayJobState

    rayjob = ROOT / "ray.io" / "RayJob"
    objs = [yaml.safe_load((rayjob / "testdata" / f"{n}.yaml").read_text()) for n in KUEUE_SEQUENCE]
    health = [run_health(rayjob, o) for o in objs]
    assert {h["status"] for h in health} == {"Progressing"}, dict(zip(KUEUE_SEQUENCE, health))
    outcomes = [RayJobState.from_object(o).outcome for o in objs]
    assert outcomes == ["queued"] * 4 + ["running"] * 3 + ["queued"] * 2, outcomes
    for o in objs:
        assert o["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    # KubeRay's writes: no cluster and no Ray job while queued; the admitted run has its own startTime
    for o, n in zip(objs, KUEUE_SEQUENCE):
        st = o.get("status") or {}
        if n in ("kueue-queued", "kueue-admitted"):
            assert (st["jobDeploymentStatus"], "rayClusterName" in st, "jobId" in st, "jobStatus" in st) == \
                ("Suspended", False, False, False)
    assert objs[6]["status"]["startTime"] > objs[3]["status"]["startTime"]
    # without the label the same suspended object is Argo CD's Suspended (a person suspended it), not queued
    plain = copy.deepcopy(objs[3])
    del plain["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert run_health(rayjob, plain)["status"] == "Suspended"
    assert RayJobState.from_object(plain).outcome == "running"


# The transitions KubeRay v1.7.0 writes for a RayJob whose first attempt fails and whose retry succeeds
# (backoffLimit 1), in order: every one but the last is Progressing, none Degraded (a sync must not fail while
# KubeRay retries). tests/test_k8s_client.py replays the same files through `dolly-train wait`.
RETRY_SEQUENCE = ["new", "initializing", "running-not-submitted", "pending", "running", "attempt-failed-will-retry",
                  "retrying", "retry-new", "retry-initializing", "retry-running", "retry-succeeded"]


def test_a_retried_rayjob_is_progressing_until_it_succeeds():
    rayjob = ROOT / "ray.io" / "RayJob"
    objs = [yaml.safe_load((rayjob / "testdata" / f"{n}.yaml").read_text()) for n in RETRY_SEQUENCE]
    statuses = [run_health(rayjob, o)["status"] for o in objs]
    assert statuses == ["Progressing"] * (len(objs) - 1) + ["Healthy"], dict(zip(RETRY_SEQUENCE, statuses))
    retrying = objs[RETRY_SEQUENCE.index("retrying")]["status"]
    assert (retrying["jobDeploymentStatus"], retrying["jobStatus"], retrying["failed"]) == ("Retrying", "FAILED", 1)
    assert "endTime" not in retrying  # Retrying is not terminal (updateRayJobStatus sets endTime only then)
    msg = run_health(rayjob, objs[RETRY_SEQUENCE.index("retrying")])["message"]
    assert "Attempt 1 of 2 failed" in msg and "attempt 2 of 2" in msg


def test_fixtures_carry_the_status_fields_kuberay_writes():
    """After its first reconcile KubeRay always writes failed and succeeded (checkBackoffLimitAndUpdateStatusIfNeeded)
    and startTime (initRayJobStatusIfNeed); ValidationFailed returns before both. Terminal deployments have endTime."""
    for path in sorted((ROOT / "ray.io" / "RayJob" / "testdata").glob("*.yaml")):
        st = yaml.safe_load(path.read_text()).get("status")
        if st is None:
            continue
        if st["jobDeploymentStatus" if "jobDeploymentStatus" in st else "failed"] == "ValidationFailed":
            continue
        assert {"failed", "succeeded", "startTime"} <= set(st), path.name
        assert ("endTime" in st) == (st.get("jobDeploymentStatus") in ("Complete", "Failed")), path.name
        if st.get("jobDeploymentStatus") in ("Failed", "Retrying"):
            assert st.get("reason") and st.get("message"), path.name
        assert "observedGeneration" not in st, path.name  # the RayJob controller never writes it
