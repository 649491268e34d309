"""scripts/kind-smoke.sh and manifests/kind/cluster.yaml. The smoke test itself needs docker and kind (not on the
build machines; .github/workflows/kind-smoke.yaml runs it). Checked here: syntax, that it refuses to start
without its tools, and that every name it relies on agrees with the chart, the eval Job and the CLI."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import yaml

import k8s_validate

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "kind-smoke.sh"


def script_vars() -> dict[str, str]:
    """Plain `name=value` / `name=${ENV:-default}` assignments at the top level of the script."""
    out = {}
    for m in re.finditer(r"^([a-z_]+)=(.*)$", SCRIPT.read_text(), re.M):
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", m.group(2))
        out[m.group(1)] = value
    return out


def test_bash_syntax():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and re.search(r"^trap cleanup EXIT$", text, re.M)


def test_refuses_to_start_without_its_tools(tmp_path):
    """With no docker/kind on PATH it stops at once with exit 2, naming the missing tool, creating nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "head", "dirname", "mktemp", "rm"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert res.returncode == 2, res.stderr
    assert "'docker' is not on PATH" in res.stderr
    assert "kind create" not in res.stdout


def test_kind_cluster_config():
    cfg = yaml.safe_load((REPO / "manifests" / "kind" / "cluster.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert cfg["name"] == script_vars()["cluster"]
    nodes = cfg["nodes"]
    # One node: the chart's ReadWriteOnce claim (values-cpu-smoke.yaml) is shared by every pod only on one node.
    assert len(nodes) == 1 and nodes[0]["role"] == "control-plane"
    m = re.fullmatch(r"kindest/node:v(\d+)\.(\d+)\.(\d+)", nodes[0]["image"])
    assert m, f"node image {nodes[0]['image']} is not pinned"
    chart = yaml.safe_load((REPO / "charts" / "dolly-train" / "Chart.yaml").read_text())
    need = re.search(r"(\d+)\.(\d+)", chart["kubeVersion"])
    assert (int(m.group(1)), int(m.group(2))) >= (int(need.group(1)), int(need.group(2))), chart["kubeVersion"]


def test_names_agree_with_chart_eval_job_and_project():
    v = script_vars()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    values = yaml.safe_load((REPO / v["values"]).read_text())
    assert v["image"].replace("$version", version) == f"{values['image']['repository']}:{version}"
    assert (REPO / v["eval_job"]).is_file()
    eval_docs = [d for d in yaml.safe_load_all((REPO / v["eval_job"]).read_text()) if d]
    jobs = [d for d in eval_docs if d["kind"] == "Job"]
    assert len(jobs) == 1, "the script takes the one Job out of `kubectl apply -o name`"
    images = {c["image"] for c in jobs[0]["spec"]["template"]["spec"].get("initContainers", []) +
              jobs[0]["spec"]["template"]["spec"]["containers"]}
    assert images == {v["image"].replace("$version", version)}
    assert v["kuberay_version"] == "1.7.0"


def test_rayjob_is_found_by_the_label_the_script_selects(tmp_path):
    """`kubectl get rayjobs -l app.kubernetes.io/instance=$release` must find the chart's RayJob."""
    helm = k8s_validate.tool("helm")
    v = script_vars()
    res = subprocess.run([helm, "template", v["release"], str(REPO / "charts" / "dolly-train"), "-f",
                          str(REPO / v["values"]), "--namespace", v["ns"]], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rayjobs = [d for d in yaml.safe_load_all(res.stdout) if d and d["kind"] == "RayJob"]
    assert len(rayjobs) == 1
    selector = re.search(r"-l \"app\.kubernetes\.io/instance=\$release\"", SCRIPT.read_text())
    assert selector and rayjobs[0]["metadata"]["labels"]["app.kubernetes.io/instance"] == v["release"]


def test_dolly_train_wait_call_parses():
    """The script's `dolly-train wait ...` line is a valid invocation of the real CLI parser."""
    from trainer.cli import build_parser

    v = {**script_vars(), "rayjob": "dolly-train"}
    line = next(l.strip() for l in SCRIPT.read_text().splitlines() if l.strip().startswith("dolly-train wait"))
    line = re.sub(r"\$(\w+)", lambda m: v[m.group(1)], line)
    args = build_parser("wait").parse_args(shlex.split(line)[1:])
    assert (args.command, args.name, args.namespace, args.timeout) == ("wait", "dolly-train", v["ns"], float(v["timeout"]))
