"""The wheels the GPU image lacks, by purpose, as cp312 manylinux wheels - and the proof that each bundle is whole.

    python bench/gpu_wheels_resolve.py fetch CACHE_DIR BUNDLE_DIR IMAGE_FILE PURPOSE...
    python bench/gpu_wheels_resolve.py check BUNDLE_DIR/PURPOSE IMAGE_FILE PURPOSE [REQUIREMENT...]
    python bench/gpu_wheels_resolve.py --pins NAME...    # NAME's pin in pyproject.toml, one per line

Purposes (PURPOSES below): `train` (DeepSpeed, datasets, mistral-common: bench/train_throughput.py and
`dolly-train init-model/prepare/export`), `ray` (Ray Train: `dolly-train train`), `eval` (vLLM 0.25.0,
rouge-score, sentencex: `dolly-eval`, bench/eval_speed.py), `lora` (bitsandbytes: the image has peft).
`fetch` downloads each purpose's requirements and what they need beyond the image into CACHE_DIR (shared, so
a package has one version across purposes), copies each purpose's wheels to BUNDLE_DIR/PURPOSE and checks it.
Versions: a package pyproject.toml pins (`==`) is downloaded at that pin wherever it is needed (this is how
apache-tvm-ffi stays at 0.1.15.post2: the newest breaks xgrammar 0.2.9 at import); others at the newest
release their dependents allow.

`check` is the proof that needs no GPU: every wheel's `Requires-Dist` - environment markers evaluated for
CPython 3.12 on x86-64 Linux, with the extras the purpose actually asks for - is met by a wheel in the bundle
(name and version) or by the GPU image (IMAGE_FILE: `name` or `name==version` entries separated by newlines or
", ", e.g. bench/gpu_image_packages.txt; a version, where known, is checked too), and every wheel's tags install
on CPython 3.12 manylinux x86-64. Anything else fails, naming the wheel and the requirement it misses. What is
left out on purpose (NOT_BROUGHT) is listed, not failed.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "os_name": "posix",
           "platform_release": "", "platform_version": "", "extra": ""}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64"]
# The tags a wheel may carry to install on the GPU image (CPython 3.12, glibc 2.35 or older manylinux, x86-64).
_PLATFORM_TAGS = [*PLATFORMS, "linux_x86_64"]
TAGS = {str(t) for t in [*cpython_tags((3, 12), platforms=_PLATFORM_TAGS),
                         *compatible_tags((3, 12), "cp312", platforms=_PLATFORM_TAGS)]}

# What each purpose brings (names as pyproject.toml spells them; extras in brackets are the ones used).
PURPOSES: dict[str, list[str]] = {
    # bench/train_throughput.py, `dolly-train init-model/prepare/export`: DeepSpeed's engine, the data dir's
    # reader/writer, the v3 tokenizer; no Ray (the bench runs at world size 1 through LocalContext)
    "train": ["deepspeed", "datasets", "mistral-common"],
    # `dolly-train train` through Ray Train (`ray start --head --include-dashboard=false`: the default/dashboard
    # extra is not used on the GPU machine; the chart's image installs it)
    "ray": ["ray[train]"],
    # `dolly-eval`: vLLM 0.25.0 (pins the image's torch 2.11.0), ROUGE; gguf and importlib-metadata are imported
    # by vLLM's model loader on this path without being in its Requires-Dist for Python 3.12
    "eval": ["vllm", "rouge-score", "sentencex", "apache-tvm-ffi", "nltk", "gguf", "importlib-metadata"],
    # LoRA / QLoRA (issue 25): peft is in the image, bitsandbytes (NF4 layers) is not; 43 MB, so its own piece
    "lora": ["bitsandbytes"],
}
# Source-only on PyPI (rouge-score) or wanted without compiled ops (DeepSpeed JIT-builds them on first use):
# built here with `pip wheel --no-deps` (DS_BUILD_OPS=0); their Requires-Dist are followed like any other's.
BUILT = {"deepspeed", "rouge-score"}
# Listed by vLLM 0.25.0 for other models or kernels, not imported by its offline generation of a Mistral model
# (it ran without them on the H200, 2026-12-02 and 2026-12-05; FlashInfer's absence needs
# VLLM_USE_FLASHINFER_SAMPLER=0, which `install` sets); together they are over 700 MB.
NOT_BROUGHT = {canonicalize_name(n): why for why, names in {
    "optional GPU kernels vLLM does not import for Mistral offline generation": (
        "xformers", "flashinfer-python", "flashinfer-cubin", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base",
        "tokenspeed-triton", "tokenspeed-mla", "tilelang", "quack-kernels", "humming-kernels",
        "nvidia-cudnn-frontend"),
    "media/other models' inputs, not imported for text generation": (
        "pynvvideocodec", "torchcodec", "z3-solver", "anthropic", "cuda-python"),
}.items() for n in names}
# Requirements a wheel declares that the bundle knowingly does not meet, each with what ran instead.
WAIVED = {
    ("vllm", "apache-tvm-ffi"): "vLLM 0.25.0 pins apache-tvm-ffi 0.1.9, which xgrammar 0.2.9 refuses (>=0.1.11); "
                                "0.1.15.post2 with xgrammar 0.2.9 ran on the H200 (2026-12-01), the newest breaks "
                                "xgrammar's import (pyproject.toml, gpu-bundle)",
    ("mistral-common", "numpy"): "the image's numpy 2.5.2 (above mistral-common's <2.4 for Python <= 3.12): "
                                 "prepare and vLLM's tokenizer import ran with it on the H200 (2026-12-01, -02)",
}


def pyproject_pins() -> dict[str, str]:
    """name -> 'name==version' for every exact pin in pyproject.toml (any dependency list; extras dropped)."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    found = {}
    for spec in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        req = Requirement(spec)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
            found[canonicalize_name(req.name)] = f"{req.name}=={specs[0].version}"
    return found


def pins(names: list[str]) -> list[str]:
    found = pyproject_pins()
    missing = [n for n in names if canonicalize_name(Requirement(n).name) not in found]
    if missing:
        raise SystemExit(f"pyproject.toml pins none of: {', '.join(missing)}")
    return [found[canonicalize_name(Requirement(n).name)] for n in names]


def read_image(path: str | Path) -> dict[str, Version | None]:
    """The GPU image's packages: name -> version where the list gives one."""
    out: dict[str, Version | None] = {}
    for entry in re.split(r"[,\n]", Path(path).read_text()):
        entry = entry.split("#", 1)[0].strip()
        if entry:
            name, _, ver = entry.partition("==")
            out[canonicalize_name(name.strip())] = Version(ver.strip()) if ver.strip() else None
    if not out:
        raise SystemExit(f"{path}: no package names")
    return out


@dataclass
class Wheel:
    path: Path
    name: str
    version: Version
    requires: list[str] = field(default_factory=list)


def read_wheel(path: Path) -> Wheel:
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = email.message_from_bytes(z.read(meta))
    return Wheel(path, canonicalize_name(name), version, msg.get_all("Requires-Dist") or [])


def wheels_in(folder: Path) -> dict[str, Wheel]:
    """name -> Wheel; two versions of one package are refused (pip would stop the whole install)."""
    out: dict[str, Wheel] = {}
    for p in sorted(folder.glob("*.whl")):
        w = read_wheel(p)
        if w.name in out:
            raise SystemExit(f"{folder}: two wheels of {w.name}: {out[w.name].path.name} and {p.name}")
        out[w.name] = w
    return out


def applies(req: Requirement, extras: set[str]) -> bool:
    """Whether `req` (one Requires-Dist line) is needed when its package is installed with `extras`."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKERS, "extra": e}) for e in {"", *extras})


def closure(top: list[Requirement], have: dict[str, Wheel], image: dict, on_missing) -> dict[str, set[str]]:
    """Walk the requirements from `top` through the wheels in `have` (name -> Wheel; `on_missing(req, why)`
    may add one and return it, or None); returns the names reached with the extras each is used with."""
    used: dict[str, set[str]] = {}
    todo = [(r, "the purpose") for r in top]
    while todo:
        req, why = todo.pop(0)
        name = canonicalize_name(req.name)
        if name in image or name in NOT_BROUGHT:
            continue
        extras = set(req.extras)
        if name in used and extras <= used[name]:
            continue
        wheel = have.get(name) or on_missing(req, why)
        if wheel is None:
            continue
        have[name] = wheel
        new = extras - used.get(name, set()) if name in used else extras | {""}
        used.setdefault(name, set()).update(extras)
        for dep in wheel.requires:
            d = Requirement(dep)
            if d.marker is None or any(d.marker.evaluate({**MARKERS, "extra": e}) for e in new):
                todo.append((d, f"{wheel.path.name}"))
    return used


def check(bundle: Path, image: dict[str, Version | None], top: list[str]) -> list[str]:
    """Problems of one purpose's bundle (empty: it is whole); prints what is met how."""
    have = wheels_in(bundle)
    problems = []
    for w in have.values():
        if not TAGS & {str(t) for t in parse_wheel_filename(w.path.name)[3]}:
            problems.append(f"{w.path.name}: its tags install on no CPython 3.12 manylinux x86-64")

    def missing(req: Requirement, why: str):
        problems.append(f"{why}: needs {req} - neither in the bundle nor in the GPU image")
        return None

    used = closure([Requirement(t) for t in top], have, image, missing)
    left_out, waived = set(), set()
    for name, extras in used.items():
        w = have[name]
        for dep in w.requires:
            d = Requirement(dep)
            if not applies(d, extras):
                continue
            dn = canonicalize_name(d.name)
            if dn in NOT_BROUGHT:
                left_out.add(f"{dn} ({NOT_BROUGHT[dn]})")
            elif dn in have or dn in image:
                got, where = (have[dn].version, "the bundle") if dn in have else (image[dn], "the GPU image")
                if got is None or not d.specifier or d.specifier.contains(got, prereleases=True):
                    continue
                if (name, dn) in WAIVED:
                    waived.add(f"{w.path.name} needs {d}, {where} has {got}: {WAIVED[name, dn]}")
                else:
                    problems.append(f"{w.path.name}: needs {d}, {where} has {dn} {got}")
            # neither: closure() reported it already
    for t in top:
        t = Requirement(t)
        n = canonicalize_name(t.name)
        if n in have and t.specifier and not t.specifier.contains(have[n].version, prereleases=True):
            problems.append(f"the purpose asks for {t}, the bundle has {n} {have[n].version}")
    unused = sorted(set(have) - set(used))
    print(f"{bundle.name}: {len(have)} wheels, {sum(w.path.stat().st_size for w in have.values()) / 1e6:.1f} MB; "
          f"every Requires-Dist met by the bundle or the image" if not problems else
          f"{bundle.name}: {len(problems)} problem(s)", file=sys.stderr)
    if left_out:
        print(f"  left out on purpose: {', '.join(sorted(left_out))}", file=sys.stderr)
    for line in sorted(waived):
        print(f"  waived: {line}", file=sys.stderr)
    if unused:
        print(f"  in the bundle but needed by nothing asked for: {', '.join(unused)}", file=sys.stderr)
    return problems


def top_requirements(purpose: str) -> list[str]:
    """The purpose's requirements, each at its pyproject.toml pin where there is one (extras kept)."""
    found = pyproject_pins()
    out = []
    for spec in PURPOSES[purpose]:
        req = Requirement(spec)
        pin = found.get(canonicalize_name(req.name))
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}{pin[len(Requirement(pin).name):]}" if pin else spec)
    return out


def _download(cache: Path, spec: str) -> None:
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *platform_args, "-d", str(cache), spec]
    subprocess.run(cmd, check=True)


def _build(cache: Path, spec: str) -> None:
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed: pure Python, ops JIT-built on the GPU machine
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(cache), spec],
                   check=True, env=env)


def fetch(cache: Path, bundles: Path, image: dict, purposes: list[str]) -> list[str]:
    cache.mkdir(parents=True, exist_ok=True)
    found = pyproject_pins()
    narrowed: dict[str, SpecifierSet] = {}  # unpinned packages a later requirement wanted older/newer
    problems = []
    for purpose in purposes:
        top = top_requirements(purpose)

        def get(req: Requirement, why: str):
            name = canonicalize_name(req.name)
            spec = found.get(name) or f"{req.name}{req.specifier & narrowed.get(name, SpecifierSet())}"
            print(f"{purpose}: {spec} (for {why})", file=sys.stderr)
            (_build if name in BUILT else _download)(cache, spec)
            got = wheels_in(cache).get(name)
            if got is None:
                raise SystemExit(f"pip gave no wheel for {spec}")
            return got

        # No backtracking resolver here: the newest release a first requirement allows can break a later one
        # (opentelemetry-api 1.45.3 for vLLM, ==1.45.2 for opentelemetry-sdk). Such a package is fetched again
        # within every specifier seen, a few rounds at most; pyproject.toml's pins are never moved.
        for _ in range(5):
            used = closure([Requirement(t) for t in top], wheels_in(cache), image, get)
            cached = wheels_in(cache)
            redo = _unpinned_conflicts(used, cached, found)
            if not redo:
                break
            for name, spec in redo.items():
                narrowed[name] = narrowed.get(name, SpecifierSet()) & spec
                print(f"{purpose}: {name} {cached[name].version} is outside {narrowed[name]}: fetched again",
                      file=sys.stderr)
                cached[name].path.unlink()
        out = bundles / purpose
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name in used:
            shutil.copy2(cached[name].path, out / cached[name].path.name)
        problems += [f"{purpose}: {p}" for p in check(out, image, top)]
    return problems


def _unpinned_conflicts(used: dict[str, set[str]], have: dict[str, Wheel], pinned: dict) -> dict[str, SpecifierSet]:
    """Packages not pinned by pyproject.toml whose fetched version a requirement in `used` refuses."""
    out: dict[str, SpecifierSet] = {}
    for name, extras in used.items():
        for dep in have[name].requires:
            d = Requirement(dep)
            dn = canonicalize_name(d.name)
            if (applies(d, extras) and dn in have and dn not in pinned and (name, dn) not in WAIVED
                    and d.specifier and not d.specifier.contains(have[dn].version, prereleases=True)):
                out[dn] = out.get(dn, SpecifierSet()) & d.specifier
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--pins"]:
        print("\n".join(pins(argv[1:])))
        return 0
    if argv[:1] == ["fetch"] and len(argv) >= 5:
        unknown = [p for p in argv[4:] if p not in PURPOSES]
        if unknown:
            raise SystemExit(f"unknown purpose(s) {', '.join(unknown)}; known: {', '.join(PURPOSES)}")
        problems = fetch(Path(argv[1]), Path(argv[2]), read_image(argv[3]), argv[4:])
    elif argv[:1] == ["check"] and len(argv) >= 4:
        top = argv[4:] or top_requirements(argv[3])
        problems = check(Path(argv[1]), read_image(argv[2]), top)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"MISSING {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
