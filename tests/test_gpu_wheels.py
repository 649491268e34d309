"""bench/gpu_wheels.sh and bench/gpu_wheels_resolve.py on this CPU machine: the Requires-Dist proof of a bundle,
on small real wheels from PyPI (jsonschema and what it needs, as cp312 manylinux wheels, downloaded the way `pack`
downloads), and the pieces' round trip through `stash` and `install`."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_wheels_resolve", REPO / "bench" / "gpu_wheels_resolve.py")
R = sys.modules["gpu_wheels_resolve"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)

# jsonschema needs attrs (in the GPU image), referencing, jsonschema-specifications and rpds-py (compiled);
# referencing needs typing-extensions only below Python 3.13; the `format` extra needs fqdn, idna, ...
WHEELS = ["jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1"]
IMAGE = "attrs==25.3.0, typing-extensions\nidna\n"


def _download(dest: Path, python: str, *reqs: str) -> None:
    platforms = [a for p in R.PLATFORMS for a in ("--platform", p)]
    p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--implementation", "cp", *platforms, "-d", str(dest), *reqs],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and any(s in p.stderr for s in ("Connection", "NewConnectionError", "Max retries")):
        pytest.skip(f"the package index is not reachable from here: {p.stderr[-300:]}")
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    _download(d / "cp312", "3.12", *WHEELS)
    _download(d / "cp311", "3.11", "rpds-py==2026.9.1")
    return d


def bundle(tmp_path: Path, wheels: Path, drop: tuple[str, ...] = (), add: tuple[Path, ...] = ()) -> Path:
    out = tmp_path / "bundle"
    out.mkdir()
    for w in (wheels / "cp312").glob("*.whl"):
        if not w.name.startswith(drop):
            shutil.copy(w, out)
    for w in add:
        shutil.copy(w, out)
    return out


def image(tmp_path: Path, text: str = IMAGE) -> dict:
    f = tmp_path / "image.txt"
    f.write_text(text)
    return R.read_image(f)


def test_a_whole_bundle_passes(tmp_path, wheels, capsys):
    assert R.check(bundle(tmp_path, wheels), image(tmp_path), ["jsonschema==4.26.0"]) == []
    assert "4 wheels" in capsys.readouterr().err


def test_a_missing_requirement_names_the_wheel_and_the_requirement(tmp_path, wheels):
    problems = R.check(bundle(tmp_path, wheels, drop=("rpds_py",)), image(tmp_path), ["jsonschema"])
    # both wheels that need rpds-py are named, each with its own requirement
    assert any("jsonschema-4.26.0-py3-none-any.whl" in p and "rpds-py>=0.25.0" in p for p in problems), problems
    assert any("referencing-0.37.0-py3-none-any.whl" in p and "rpds-py>=0.7.0" in p for p in problems), problems
    assert len(problems) == 2


def test_markers_are_evaluated_for_python_3_12(tmp_path, wheels):
    # referencing: `typing-extensions>=4.4.0; python_version < '3.13'` applies on the GPU image's Python 3.12
    problems = R.check(bundle(tmp_path, wheels), image(tmp_path, "attrs==25.3.0"), ["jsonschema"])
    assert problems == ["referencing-0.37.0-py3-none-any.whl: needs typing-extensions>=4.4.0; "
                        "python_version < \"3.13\" - neither in the bundle nor in the GPU image"]


def test_only_the_extras_asked_for_are_followed(tmp_path, wheels):
    img = image(tmp_path)
    b = bundle(tmp_path, wheels)
    assert R.check(b, img, ["jsonschema"]) == []  # `format` lines ignored when the extra is not used
    problems = R.check(b, img, ["jsonschema[format]"])
    missing = sorted(p.split("needs ")[1].split(";")[0] for p in problems)
    # idna is in the image; the other seven of the extra are not
    assert missing == ["fqdn", "isoduration", "jsonpointer>1.13", "rfc3339-validator", "rfc3987", "uri-template",
                       "webcolors>=1.11"]


def test_an_image_package_too_old_fails(tmp_path, wheels):
    problems = R.check(bundle(tmp_path, wheels), image(tmp_path, "attrs==21.4.0, typing-extensions"), ["jsonschema"])
    assert sorted(problems) == [
        "jsonschema-4.26.0-py3-none-any.whl: needs attrs>=22.2.0, the GPU image has attrs 21.4.0",
        "referencing-0.37.0-py3-none-any.whl: needs attrs>=22.2.0, the GPU image has attrs 21.4.0"]


def test_a_wheel_for_another_python_fails_and_two_versions_are_refused(tmp_path, wheels):
    cp311 = next((wheels / "cp311").glob("rpds_py-*.whl"))
    problems = R.check(bundle(tmp_path, wheels, drop=("rpds_py",), add=(cp311,)), image(tmp_path), ["jsonschema"])
    assert problems == [f"{cp311.name}: its tags install on no CPython 3.12 manylinux x86-64"]
    b2 = tmp_path / "two"
    b2.mkdir()
    (tmp_path / "two" / cp311.name).write_bytes(cp311.read_bytes())
    shutil.copy(next((wheels / "cp312").glob("rpds_py-*.whl")), b2)
    with pytest.raises(SystemExit, match="two wheels of rpds-py"):
        R.wheels_in(b2)


def test_purposes_take_pyproject_pins_with_their_extras():
    assert R.top_requirements("ray") == ["ray[train]==2.60.0"]
    ev = R.top_requirements("eval")
    assert "vllm==0.25.0" in ev and "apache-tvm-ffi==0.1.15.post2" in ev and "nltk==3.10.4" in ev
    assert "rouge-score==0.1.2" in ev
    assert R.top_requirements("train")[0] == "deepspeed==0.19.8"
    assert R.top_requirements("lora") and R.top_requirements("lora")[0].startswith("bitsandbytes")


def test_the_image_list_reads_both_forms():
    img = R.read_image(REPO / "bench" / "gpu_image_packages.txt")
    assert str(img["torch"]) == "2.11.0" and str(img["transformers"]) == "5.17.0" and img["peft"] is None
    assert "vllm" not in img and "ray" not in img and "deepspeed" not in img and "bitsandbytes" not in img


def test_pieces_stash_and_install_round_trip(tmp_path, wheels):
    """`install` joins the pieces of each purpose, checks the sha256 and installs each into its own target;
    a purpose with a piece still missing is left for a later call."""
    pure = [w for w in (wheels / "cp312").glob("*.whl") if "py3-none-any" in w.name]
    tar = tmp_path / "demo.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(pure[0].parent), *[w.name for w in pure]], check=True)
    data = tar.read_bytes()
    half = len(data) // 2
    parts, site = tmp_path / "parts", tmp_path / "site"
    for i, (letter, chunk) in enumerate((("a", data[:half]), ("b", data[half:]))):
        piece = tmp_path / f"demo-{letter}"
        piece.mkdir()
        (piece / f"piece.demo.{letter}").write_bytes(chunk)
        if i == 0:
            import hashlib

            (piece / "demo.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
            (piece / "demo.pieces").write_text("2\n")
    script = REPO / "bench" / "gpu_wheels.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PARTS": str(parts), "SITE": str(site)}

    def sh(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=300)

    assert sh(f"bash {script} stash {tmp_path / 'demo-a'}").returncode == 0
    first = sh(f"source {script} install")
    assert first.returncode == 0 and "demo has 1 of 2 pieces" in first.stderr, first.stderr
    assert not (site / "demo").exists()
    assert sh(f"bash {script} stash {tmp_path / 'demo-b'}").returncode == 0
    done = sh(f"source {script} install && echo PYTHONPATH=$PYTHONPATH "
              "VLLM_USE_FLASHINFER_SAMPLER=$VLLM_USE_FLASHINFER_SAMPLER")
    assert done.returncode == 0, done.stderr
    assert f"PYTHONPATH={site / 'demo'} VLLM_USE_FLASHINFER_SAMPLER=0" in done.stdout, done.stdout
    for pkg in ("jsonschema", "referencing", "jsonschema_specifications"):
        assert (site / "demo" / pkg / "__init__.py").is_file(), pkg
    # a corrupted piece fails the sha256 check instead of installing
    shutil.rmtree(site)
    (parts / "piece.demo.b").write_bytes(b"x" + data[half + 1:])
    bad = sh(f"source {script} install")
    assert bad.returncode != 0 and not (site / "demo" / ".installed").exists()
