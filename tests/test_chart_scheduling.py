"""The chart's preemption hook and Kueue values (charts/dolly-train: preemption.*, kueue.*), rendered with helm.

Every rendered object is also validated against the Kubernetes and KubeRay schemas by tests/test_chart.py (its
matrix has a `kueue` case); the hook itself runs against KubeRay's worker command in tests/test_preemption_pod.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

import k8s_validate as kv

CHART = Path(__file__).resolve().parents[1] / "charts" / "dolly-train"


def template(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([kv.tool("helm"), "template", "dolly-train", str(CHART), "--kube-version", "1.30", *args],
                         capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(res.stderr)
    return res


def rayjob(*args: str) -> dict:
    (job,) = [o for o in yaml.safe_load_all(template(*args).stdout) if o and o["kind"] == "RayJob"]
    return job


def worker_containers(job: dict) -> list[dict]:
    return [g["template"]["spec"]["containers"][0] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]


# ---- preemption ------------------------------------------------------------------------------------------------

def test_workers_get_the_prestop_hook_and_its_pid_dir_the_head_does_not():
    job = rayjob("--set-json", 'additionalWorkerGroups={"spare":{"replicas":1,"terminationGracePeriodSeconds":120}}',
                 "--set", "train.scaling.num_workers=16")
    workers = worker_containers(job)
    assert len(workers) == 2
    for c, grace in zip(workers, (300, 120)):
        cmd = c["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[:2] == ["/bin/bash", "-c"]
        # waits at most the grace period less preemption.reserveSeconds (45 s for `ray start` to drain and stop)
        assert f"end=$((SECONDS + {grace - 45}))" in cmd[2]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["DOLLY_SIGTERM_PID_DIR"] == "/dev/shm/dolly-train-sigterm"
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])  # per-pod, memory-backed
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "lifecycle" not in head and "DOLLY_SIGTERM_PID_DIR" not in {e["name"] for e in head["env"]}
    # the script parses as bash
    for c in workers:
        res = subprocess.run(["bash", "-n", "-c", c["lifecycle"]["preStop"]["exec"]["command"][2]],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_prestop_off_removes_hook_and_env():
    for c in worker_containers(rayjob("--set", "preemption.preStop=false")):
        assert "lifecycle" not in c and "DOLLY_SIGTERM_PID_DIR" not in {e["name"] for e in c["env"]}


def test_grace_period_too_short_for_the_hook_is_refused():
    res = template("--set", "worker.terminationGracePeriodSeconds=50", check=False)
    assert res.returncode != 0 and "worker group gpu: terminationGracePeriodSeconds 50" in res.stderr, res.stderr
    assert "preemption.reserveSeconds 45" in res.stderr
    template("--set", "worker.terminationGracePeriodSeconds=50", "--set", "preemption.reserveSeconds=20")
    template("--set", "worker.terminationGracePeriodSeconds=50", "--set", "preemption.preStop=false")


# ---- Kueue -------------------------------------------------------------------------------------------------------

def test_kueue_queue_labels_the_rayjob_and_creates_it_suspended():
    """What Kueue v0.19.2's RayJob integration reads: the label kueue.x-k8s.io/queue-name (QueueLabel,
    pkg/controller/constants), kueue.x-k8s.io/priority-class (WorkloadPriorityClassLabel), spec.suspend (Kueue
    un-suspends on admission), and what its webhook requires (shutdownAfterJobFinishes, a rayClusterSpec, no
    clusterSelector, no enableInTreeAutoscaling, no worker group named "head")."""
    job = rayjob("--set", "kueue.queueName=team-a", "--set", "kueue.priorityClassName=batch-low")
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/priority-class"] == "batch-low"
    spec = job["spec"]
    assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True
    assert "clusterSelector" not in spec and "rayClusterSpec" in spec
    assert not spec["rayClusterSpec"].get("enableInTreeAutoscaling")
    assert all(g["groupName"] != "head" for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    # the pod templates carry no queue label: Kueue admits the RayJob as one Workload, not pod by pod
    for g in [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]:
        assert "kueue.x-k8s.io/queue-name" not in g["template"]["metadata"]["labels"]


def test_no_kueue_by_default():
    job = rayjob()
    assert not [k for k in job["metadata"]["labels"] if k.startswith("kueue.x-k8s.io/")]
    assert job["spec"]["suspend"] is False
    assert rayjob("--set", "rayJob.suspend=true")["spec"]["suspend"] is True


@pytest.mark.parametrize("args,needle", [
    (["--set", "kueue.queueName=team-a", "--set", "mode=raycluster"], "kueue.queueName: set for mode raycluster"),
    (["--set", "kueue.queueName=team-a", "--set", "rayJob.shutdownAfterJobFinishes=false"],
     "set rayJob.shutdownAfterJobFinishes=true"),
    (["--set", "kueue.queueName=team-a", "--set", "worker.groupName=head"], "reserves the pod set name 'head'"),
    (["--set", "kueue.priorityClassName=batch-low"], "kueue.priorityClassName: \"batch-low\" has no effect"),
    (["--set", "kueue.queueName=Team_A"], "/kueue/queueName"),
], ids=["raycluster-mode", "cluster-outlives-job", "group-named-head", "priority-without-queue", "bad-name"])
def test_kueue_contradictions_fail_at_render_naming_the_fix(args, needle):
    res = template(*args, check=False)
    assert res.returncode != 0 and needle in res.stderr, res.stderr
