""".github/workflows/kind-smoke.yaml against GitHub's workflow schema (check-jsonschema's vendored copy), and
shellcheck on its `run:` steps and on every script under scripts/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "kind-smoke.yaml"
# every shell script: the executables under scripts/ and the benchmark drivers under bench/
SCRIPTS = sorted([p for p in (REPO / "scripts").iterdir() if p.is_file() and p.read_text().startswith("#!")]
                 + list((REPO / "bench").glob("*.sh")))


def _venv_tool(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert exe, f"{name} not found: the dev extra installs it (make install)"
    return exe


def _steps() -> list[dict]:
    wf = yaml.safe_load(WORKFLOW.read_text())
    return [s for job in wf["jobs"].values() for s in job["steps"]]


def test_workflow_matches_github_schema():
    res = subprocess.run([_venv_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_schema_check_rejects_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "run-on:"))
    res = subprocess.run([_venv_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(broken)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0


def test_workflow_runs_the_smoke_script_and_keeps_logs():
    runs = [s.get("run", "") for s in _steps()]
    assert any(r.strip() == "scripts/kind-smoke.sh" for r in runs)
    upload = next(s for s in _steps() if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "failure()"
    env = yaml.safe_load(WORKFLOW.read_text())["jobs"]["smoke"]["env"]
    assert upload["with"]["path"].rstrip("/") == env["LOG_DIR"]


@pytest.mark.parametrize("index", range(len([s for s in _steps() if "run" in s])))
def test_run_steps_pass_shellcheck(index, tmp_path):
    step = [s for s in _steps() if "run" in s][index]
    # GitHub substitutes ${{ }} before bash sees the script; a plain variable stands in for shellcheck.
    body = re.sub(r"\$\{\{[^}]*\}\}", "${GITHUB_EXPRESSION}", step["run"])
    script = tmp_path / "step.sh"
    script.write_text("#!/usr/bin/env bash\n# GitHub runs steps with: bash -e {0}\nset -e\n" + body)
    res = subprocess.run([_venv_tool("shellcheck"), "--shell=bash", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, f"step {step.get('name', index)}:\n{res.stdout}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck_and_bash_n(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    res = subprocess.run([_venv_tool("shellcheck"), "--external-sources", str(script)], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout


def test_shellcheck_is_not_toothless(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nfor f in $(ls *.txt); do rm $f; done\n")
    res = subprocess.run([_venv_tool("shellcheck"), str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "SC2045" in res.stdout
