"""Download, as cp312 manylinux wheels, REQUIREMENTs and what they need that the GPU image lacks.

    python bench/gpu_wheels_resolve.py OUT_DIR IMAGE_PACKAGES_FILE REQUIREMENT...
    python bench/gpu_wheels_resolve.py --pins NAME...    # NAME's pin in pyproject.toml, one per line

IMAGE_PACKAGES_FILE holds the image's package names separated by ", " (the device notes' list). Requirements
are followed through each wheel's `Requires-Dist` (environment markers evaluated for CPython 3.12 on x86-64
Linux, extras ignored). Used by `bench/gpu_wheels.sh pack`.
"""

from __future__ import annotations

import email
import subprocess
import tomllib
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
# Brought another way (torch is the image's own, vLLM in pieces, DeepSpeed built here), or GPU kernel packages
# that vLLM 0.25.0 lists but does not import for a Mistral model's offline generation (it ran without them on
# the H200, 2026-12-02 and 2026-12-05); together they are over 700 MB.
LEFT_OUT = {canonicalize_name(n) for n in (
    "torch", "torchaudio", "torchvision", "triton", "vllm", "deepspeed", "ray", "xformers", "flashinfer-python",
    "flashinfer-cubin", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "tokenspeed-triton", "tokenspeed-mla",
    "tilelang", "pynvvideocodec", "z3-solver", "nvidia-cudnn-frontend", "torchcodec", "quack-kernels",
    "humming-kernels", "cuda-python", "cuda-bindings", "anthropic")}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64", "any"]


def pins(names: list[str]) -> list[str]:
    """The requirement pyproject.toml pins for each name (any dependency list; extras dropped)."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    found = {}
    for spec in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        req = Requirement(spec)
        if req.specifier and "==" in str(req.specifier):
            found[canonicalize_name(req.name)] = f"{req.name}{req.specifier}"
    missing = [n for n in names if canonicalize_name(n) not in found]
    if missing:
        raise SystemExit(f"pyproject.toml pins none of: {', '.join(missing)}")
    return [found[canonicalize_name(n)] for n in names]


def requires(out: Path, name: str) -> list[str] | None:
    """Requires-Dist of the downloaded wheel of `name`, None when it is not downloaded yet."""
    for wheel in out.glob("*.whl"):
        if canonicalize_name(wheel.name.split("-")[0]) == name:
            with zipfile.ZipFile(wheel) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                return email.message_from_bytes(z.read(meta)).get_all("Requires-Dist") or []
    return None


def main(out_dir: str, image_packages: str, *wanted: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    present = {canonicalize_name(n) for n in Path(image_packages).read_text().replace("\n", " ").split(", ")}
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    todo, seen = list(wanted), set()
    while todo:
        req = Requirement(todo.pop(0))
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        if requires(out, name) is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp", *platform_args, "-d", str(out),
                            str(req)], check=True)
        for dep in requires(out, name):
            d = Requirement(dep)
            if d.marker and not d.marker.evaluate(MARKERS):
                continue
            if canonicalize_name(d.name) not in present | LEFT_OUT | seen:
                print(f"{name} needs {dep}")
                todo.append(dep)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pins"]:
        print("\n".join(pins(sys.argv[2:])))
    elif len(sys.argv) < 4:
        sys.exit(__doc__)
    else:
        main(*sys.argv[1:])
