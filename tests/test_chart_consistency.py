"""Values that contradict each other fail at render time with the fix named (charts/dolly-train/templates/
consistency.yaml): each pair is rendered with the real helm binary, must fail naming the value and the fix, and the
fix the message names must then render."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

import k8s_validate as kv

CHART = Path(__file__).resolve().parents[1] / "charts" / "dolly-train"
PROMETHEUS = '[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]'
PEERS = '[{"podSelector":{"matchLabels":{"role":"ray-client"}}}]'

# (id, values file, contradicting args, words the error must contain, the fix it names as args)
PAIRS = [
    ("service-monitor-behind-the-network-policy", "values.yaml",
     ["--set", "metrics.serviceMonitor.enabled=true"],
     ["metrics.serviceMonitor.enabled", "8080", "metrics.scrapeFrom", "kubernetes.io/metadata.name"],
     ["--set", "metrics.serviceMonitor.enabled=true", "--set-json", f"metrics.scrapeFrom={PROMETHEUS}"]),
    ("scrape-peers-without-network-policy", "values.yaml",
     ["--set", "networkPolicy.enabled=false", "--set-json", f"metrics.scrapeFrom={PROMETHEUS}"],
     ["metrics.scrapeFrom", "networkPolicy.enabled=true"],
     ["--set", "networkPolicy.enabled=true", "--set-json", f"metrics.scrapeFrom={PROMETHEUS}"]),
    ("dashboard-peers-without-network-policy", "values.yaml",
     ["--set", "networkPolicy.enabled=false", "--set-json", f"networkPolicy.dashboardFrom={PEERS}"],
     ["networkPolicy.dashboardFrom", "networkPolicy.enabled=true"],
     ["--set", "networkPolicy.enabled=false"]),
    ("tensorboard-peers-without-tensorboard", "values.yaml",
     ["--set-json", f"tensorboard.from={PEERS}"],
     ["tensorboard.from", "tensorboard.enabled=true"],
     ["--set", "tensorboard.enabled=true", "--set-json", f"tensorboard.from={PEERS}"]),
    ("auth-secret-without-auth", "values.yaml",
     ["--set", "rayAuth.enabled=false", "--set", "rayAuth.secretName=ray-token"],
     ["rayAuth.secretName", "ray-token", "rayAuth.enabled=true"],
     ["--set", "rayAuth.enabled=true", "--set", "rayAuth.secretName=ray-token"]),
    ("progress-role-on-the-default-service-account", "values.yaml",
     ["--set", "serviceAccount.create=false"],
     ["progress.enabled", "\"default\" ServiceAccount", "serviceAccount.create=true", "progress.enabled=false"],
     ["--set", "serviceAccount.create=false", "--set", "serviceAccount.name=dolly-train-progress"]),
    ("policy-only-release-without-the-policy", "values.yaml",
     ["--set", "progress.admissionPolicyOnly=true", "--set", "progress.admissionPolicy=false"],
     ["progress.admissionPolicyOnly", "render nothing", "progress.admissionPolicy=true",
      "progress.admissionPolicyOnly=false"],
     ["--set", "progress.admissionPolicyOnly=true", "--set", "progress.admissionPolicy=true"]),
    ("policy-only-release-without-progress", "values.yaml",
     ["--set", "progress.admissionPolicyOnly=true", "--set", "progress.enabled=false"],
     ["progress.admissionPolicyOnly", "progress.enabled=false", "render nothing", "progress.enabled=true"],
     ["--set", "progress.admissionPolicyOnly=true", "--set", "progress.enabled=true"]),
    ("cpu-training-on-gpu-workers", "values-cpu-smoke.yaml",
     ["--set", "worker.gpusPerPod=1"],
     ["train.scaling.use_gpu", "\"cpu\"", "worker.gpusPerPod=0"],
     ["--set", "worker.gpusPerPod=0"]),
]


def helm_template(helm: str, values_file: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [helm, "template", "dolly-train", str(CHART), "--kube-version", "1.30", "-f", str(CHART / values_file)]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def helm() -> str:
    return kv.tool("helm")


@pytest.mark.parametrize("values_file,bad,words,fix", [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_contradicting_values_fail_with_the_fix_named_and_the_fix_renders(helm, values_file, bad, words, fix):
    res = helm_template(helm, values_file, bad)
    assert res.returncode != 0, f"accepted {bad}"
    assert "consistency.yaml" in res.stderr, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    ok = helm_template(helm, values_file, fix)
    assert ok.returncode == 0, ok.stderr
    assert [o for o in yaml.safe_load_all(ok.stdout) if o]


def test_the_shipped_values_files_are_consistent(helm):
    for vf in sorted(p.name for p in CHART.glob("values*.yaml")):
        res = helm_template(helm, vf, [])
        assert res.returncode == 0, (vf, res.stderr)
