"""checkov (pinned in pyproject.toml, its own venv: scripts/tools.sh --with-checkov) on the chart rendered with every
values file and with Argo CD's values (scripts/checkov_chart.py, what `make lint` runs), and the hardening of the
staging Job it asks for: pinned image, read-only root, UID >= 10000, the Hugging Face token as a mounted file that
huggingface_hub itself reads. One checkov run over all renders takes ~15 s here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import k8s_validate as kv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import checkov_chart  # noqa: E402

DIGEST = "sha256:" + "0123456789abcdef" * 4


def checkov_bin() -> str:
    """.tools/bin/checkov as `make tools` installs it, else one on PATH; installed the same way when neither is there
    (a failed install fails). test_checkov_is_the_pinned_version_outside_the_project_venv checks whichever it is."""
    local = REPO / ".tools" / "bin" / "checkov"
    if local.exists():
        return str(local)
    if shutil.which("checkov"):
        return shutil.which("checkov")
    subprocess.run(["bash", str(REPO / "scripts" / "tools.sh"), str(local.parent), "--with-checkov"],
                   check=True, cwd=REPO, timeout=900)
    return str(local)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    checkov, helm = checkov_bin(), kv.tool("helm")
    plain = checkov_chart.scan(checkov, helm, [], tmp_path_factory.mktemp("plain"))
    pinned = checkov_chart.scan(checkov, helm, ["--set", f"image.digest={DIGEST}"], tmp_path_factory.mktemp("pinned"))
    return plain, pinned


def test_checkov_is_the_pinned_version_outside_the_project_venv():
    out = subprocess.run([checkov_bin(), "--version"], capture_output=True, text=True, timeout=300).stdout.strip()
    pin = next(line.split("==")[1].strip('",') for line in (REPO / "pyproject.toml").read_text().splitlines()
               if line.strip().startswith('"checkov=='))
    assert out == pin
    assert subprocess.run([sys.executable, "-c", "import checkov"], capture_output=True).returncode != 0, \
        "checkov must not be installed into the project's venv"


def test_every_render_has_no_unjustified_failure(scans):
    plain, _ = scans
    assert {r.name for r in plain} == {"values.yaml", "values-cpu-smoke.yaml", "values-gpu-8x.yaml",
                                       "values-gpu-offload.yaml", "values-gpu-lora-80gb.yaml",
                                       "values-gpu-qlora-24gb.yaml", "argocd"}
    assert checkov_chart.judge(plain) == []
    for r in plain:
        assert r.passed >= 90, (r.name, r.passed)  # checkov really read the objects
        failed = {c["check_id"] for c in r.failed}
        # What remains, each justified where it is configured: no digest can ship in the chart; kind pulls nothing.
        assert failed == ({"CKV_K8S_15", "CKV_K8S_43"} if r.name == "values-cpu-smoke.yaml" else {"CKV_K8S_43"}), r.name
        assert all(c["resource"].startswith("Job.dolly-train.") for c in r.failed)  # the staging Job, in its namespace


def test_a_pinned_image_passes_everything_and_the_justifications_go_stale(scans):
    _, pinned = scans
    assert all(r.failed == [] for r in pinned), [(r.name, [c["check_id"] for c in r.failed]) for r in pinned]
    stale = checkov_chart.judge(pinned)
    assert sorted(stale) == [
        "charts/dolly-train/values-cpu-smoke.yaml: justification for CKV_K8S_15 is stale: no render fails it any more",
        "charts/dolly-train/values.yaml: justification for CKV_K8S_43 is stale: no render fails it any more"]


def test_an_unjustified_failure_is_reported(scans, tmp_path):
    plain, _ = scans
    (smoke,) = [r for r in plain if r.name == "values-cpu-smoke.yaml"]
    bare = tmp_path / "values.yaml"  # values.yaml without its justification comment
    bare.write_text("\n".join(line for line in (checkov_chart.CHART / "values.yaml").read_text().splitlines()
                              if "checkov:skip" not in line))
    r = checkov_chart.Render(smoke.name, [bare, smoke.values[1]], smoke.failed, smoke.passed)
    problems = checkov_chart.judge([r])
    assert len(problems) == 1 and "CKV_K8S_43 (Image should use digest) FAILED for Job.dolly-train.dolly-train-staging" \
        in problems[0] and "no values file of this render justifies it" in problems[0]


def test_every_justification_names_a_reason():
    for path in checkov_chart.CHART.glob("values*.yaml"):
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                assert checkov_chart.JUSTIFICATION.search(line), (path.name, line)


# ---- the staging Job ---------------------------------------------------------------------------------------------

def staging(args: list[str] = (), values_file: str = "values.yaml") -> dict:
    cmd = [kv.tool("helm"), "template", "dolly-train", str(checkov_chart.CHART), "-f",
           str(checkov_chart.CHART / values_file), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (job,) = [o for o in yaml.safe_load_all(res.stdout) if o and o["kind"] == "Job"]
    return job


def test_staging_pod_is_hardened():
    job = staging()
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    psc, sc = spec["securityContext"], c["securityContext"]
    assert psc["runAsUser"] >= 10000 and psc["runAsNonRoot"] is True
    # Same group as the Ray pods' fsGroup, and a group-writable umask: they can use what staging writes.
    assert psc["runAsGroup"] == psc["fsGroup"] == 1000 and "umask 0002" in c["args"][0]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert env["HOME"] == "/tmp" and "emptyDir" in vols[mounts["/tmp"]]
    assert c["imagePullPolicy"] == "Always"
    pinned = staging(["--set", f"image.digest={DIGEST}"])["spec"]["template"]["spec"]["containers"][0]
    assert pinned["image"] == f"ghcr.io/dolly-train/trainer:0.1.0@{DIGEST}"
    # A per-role digest wins over the global one.
    other = "sha256:" + "f" * 64
    role = staging(["--set", f"image.digest={DIGEST}", "--set", f"staging.image.digest={other}"])
    assert role["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@" + other)
    bad = subprocess.run([kv.tool("helm"), "template", "x", str(checkov_chart.CHART), "--set", "image.digest=latest"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "/image/digest" in bad.stderr
    assert kv.validate_objects([job]) == []


def test_huggingface_hub_reads_the_token_from_the_mounted_secret(tmp_path):
    """The staging container's own env, with the Secret's file where the kubelet would mount it: the real
    huggingface_hub (what snapshot_download calls) finds the token and sends it, with no HF_TOKEN variable."""
    job = staging()
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "hf-token"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "hf-token"]
    (item,) = vol["secret"]["items"]
    secret_dir = tmp_path / mount["mountPath"].lstrip("/")
    secret_dir.mkdir(parents=True)
    (secret_dir / item["path"]).write_text("hf_testtoken123\n")  # kubectl create secret ... --from-literal keeps it raw
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert env["HF_TOKEN_PATH"] == f"{mount['mountPath']}/{item['path']}"
    child = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    child.update(HF_TOKEN_PATH=str(tmp_path / env["HF_TOKEN_PATH"].lstrip("/")), HF_HOME=str(tmp_path / "hf-home"))
    code = ("from huggingface_hub import get_token; from huggingface_hub.utils import build_hf_headers; "
            "print(get_token()); print(build_hf_headers()['authorization'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["hf_testtoken123", "Bearer", "hf_testtoken123"]
    # And nothing else in the pod carries a token in its environment.
    assert not [e for e in c["env"] if "TOKEN" in e["name"] and e["name"] != "HF_TOKEN_PATH"]
