"""checkov on what the chart renders: every values file of charts/dolly-train, and the chart under Argo CD's values.

    .venv/bin/python scripts/checkov_chart.py            # `make lint` runs it (scripts/lint.sh)
    .venv/bin/python scripts/checkov_chart.py --set image.digest=sha256:...   # extra helm arguments for every render

Each render is `helm template dolly-train charts/dolly-train -f values.yaml [-f FILE] --namespace dolly-train`,
with the namespace written into every namespaced object as `helm install -n` and Argo CD's destination do when
they apply (else checkov reports CKV_K8S_21, the default namespace, for objects that never land there). checkov
(pinned in pyproject.toml, its own venv under .tools: scripts/tools.sh) then scans them all in one run.

A failed check passes only when a values file of that render justifies it with a comment
`# checkov:skip=CKV_ID: <reason>` where the value is configured. A justification that no render needs any more
fails too, so they do not outlive their reason. Exit status 1 on any unjustified failure, stale justification or
a scan that checked nothing. checkov reads Deployments, Jobs, Services, RBAC and the like; it does not read the
pod templates inside a RayJob or RayCluster (tests/test_chart.py holds those to the same rules).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "dolly-train"
ARGO_VALUES = REPO / "manifests" / "argocd" / "values" / "dolly-train.yaml"
NAMESPACE = "dolly-train"
JUSTIFICATION = re.compile(r"#\s*checkov:skip=(CKV2?_[A-Z0-9_]+)\s*:\s*(\S.*)$")
# Kinds the chart renders that have no namespace (none today); everything else gets the release namespace.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration", "StorageClass", "PersistentVolume"}


@dataclass
class Render:
    name: str
    values: list[Path]
    failed: list[dict] = field(default_factory=list)
    passed: int = 0


def renders() -> list[Render]:
    base = CHART / "values.yaml"
    out = [Render(p.name, [base] if p == base else [base, p]) for p in sorted(CHART.glob("values*.yaml"))]
    out.append(Render("argocd", [base, ARGO_VALUES]))
    return out


def justifications(path: Path) -> dict[str, str]:
    """{check id: reason} from `# checkov:skip=CKV_ID: reason` comments of a values file."""
    found = {}
    for line in path.read_text().splitlines():
        m = JUSTIFICATION.search(line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def render(helm: str, r: Render, extra: list[str]) -> list[dict]:
    cmd = [helm, "template", "dolly-train", str(CHART), "--namespace", NAMESPACE]
    for v in r.values:
        cmd += ["-f", str(v)]
    res = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"checkov_chart: helm template ({r.name}) failed:\n{res.stderr}")
    objs = [o for o in yaml.safe_load_all(res.stdout) if o]
    for o in objs:
        if o["kind"] not in CLUSTER_SCOPED:
            o["metadata"].setdefault("namespace", NAMESPACE)
    return objs


def scan(checkov: str, helm: str, extra: list[str], workdir: Path) -> list[Render]:
    rs = renders()
    for r in rs:
        (workdir / f"{r.name}.yaml").write_text(yaml.safe_dump_all(render(helm, r, extra), sort_keys=False))
    res = subprocess.run([checkov, "-d", str(workdir), "--framework", "kubernetes", "-o", "json",
                          "--skip-download"], capture_output=True, text=True, timeout=900)
    if res.returncode not in (0, 1) or not res.stdout.strip():
        raise SystemExit(f"checkov_chart: checkov failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    reports = json.loads(res.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_file = {f"{r.name}.yaml": r for r in rs}
    for report in reports:
        results = report.get("results") or {}
        for c in results.get("failed_checks", []):
            by_file[Path(c["file_path"]).name].failed.append(c)
        for c in results.get("passed_checks", []):
            by_file[Path(c["file_path"]).name].passed += 1
    return rs


def judge(rs: list[Render]) -> list[str]:
    """Every problem: unjustified failures, stale justifications, renders checkov did not check."""
    problems = []
    used: dict[tuple[Path, str], bool] = {}
    for r in rs:
        if r.passed == 0:
            problems.append(f"{r.name}: checkov checked nothing (no passed checks)")
        allowed = {}
        for v in r.values:
            for cid in justifications(v):
                allowed.setdefault(cid, v)
                used.setdefault((v, cid), False)
        for c in r.failed:
            where = allowed.get(c["check_id"])
            if where is None:
                problems.append(f"{r.name}: {c['check_id']} ({c['check_name']}) FAILED for {c['resource']}, and no "
                                f"values file of this render justifies it (# checkov:skip={c['check_id']}: <reason>)")
            else:
                used[(where, c["check_id"])] = True
    problems += [f"{v.relative_to(REPO)}: justification for {cid} is stale: no render fails it any more"
                 for (v, cid), u in used.items() if not u]
    return problems


def report(rs: list[Render]) -> str:
    lines = []
    for r in rs:
        failed = sorted({c["check_id"] for c in r.failed})
        lines.append(f"{r.name}: {r.passed} passed, {len(r.failed)} failed"
                     + (f" (justified: {', '.join(failed)})" if failed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkov", default=None, help="checkov binary (default: .tools/bin/checkov, else PATH)")
    ap.add_argument("--helm", default=None, help="helm binary (default: .tools/bin/helm, else PATH)")
    ap.add_argument("--keep", default=None, help="write the rendered files here (default: a temp dir)")
    args, extra = ap.parse_known_args(argv)

    def find(name: str, given: str | None) -> str:
        local = REPO / ".tools" / "bin" / name
        path = given or (str(local) if local.exists() else shutil.which(name))
        if not path:
            raise SystemExit(f"checkov_chart: no {name}; run scripts/tools.sh (it installs {name} into .tools/bin)")
        return path

    checkov, helm = find("checkov", args.checkov), find("helm", args.helm)
    with tempfile.TemporaryDirectory(prefix="checkov-chart-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rs = scan(checkov, helm, extra, workdir)
    print(report(rs))
    problems = judge(rs)
    for p in problems:
        print(f"checkov_chart: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
