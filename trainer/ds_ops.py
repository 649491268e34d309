"""DeepSpeed's compiled ops: no run waits on a compiler or on a lock left by someone else's build.

DeepSpeed JIT-compiles some ops with torch's `cpp_extension.load` into the torch extensions dir, behind a
lock file (`<dir>/<op>/lock`) that a process killed mid-build leaves behind; every later run then waits on it
forever, silently. What each preset needs (docs/benchmarks.md, "fixed costs", has the measurements):

- `deepspeed_shm_comm` (CPU accelerator, every CPU run): DeepSpeed builds it whenever `deepspeed.comm` starts,
  but only `inference_all_reduce` (DeepSpeed inference / AutoTP) uses it; ZeRO training's collectives are
  torch.distributed's (gloo). `skip_unused_ops()` marks it unavailable, so no CPU run builds anything.
- `cpu_adam` (`deepspeed.offload_optimizer=true`): built once into `PREBUILT` (`python -m trainer.ds_ops
  prebuild cpu_adam`): by `scripts/install.sh` with `DS_OPS=cpu_adam`, and by the images' builder stage
  (`images/prebuild-ds-ops.sh`, `--march` for a CPU target other than the build machine's); `prepare()` then
  loads that library directly. Without a prebuilt library the op is JIT-built into a per-run extensions dir (unless
  TORCH_EXTENSIONS_DIR is set), and `check_locks()` fails fast on a stale lock, naming the file to delete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

from trainer.log import get_logger

log = get_logger(__name__)

# Installed next to the Python environment: a venv's own prefix, or the image's system prefix.
PREBUILT = Path(sys.prefix) / "share" / "dolly-train" / "torch_extensions"
UNUSED_OPS = ("deepspeed_shm_comm",)  # built by deepspeed.comm on CPU, used only by DeepSpeed inference


class StaleLockError(RuntimeError):
    """A torch extensions lock file that no live process holds: a killed build left it."""


def ops_needed(cfg) -> list[str]:
    """The JIT ops a run of `cfg` loads (after `skip_unused_ops`)."""
    return ["cpu_adam"] if cfg.deepspeed.offload_optimizer else []


def skip_unused_ops() -> None:
    """Mark the ops no training path uses as unavailable, before `deepspeed.comm` starts (it would build them).

    `deepspeed.ops.__compatible_ops__` is DeepSpeed's per-process record of the ops this machine can build
    (probed lazily; "edits to it persist"); `deepspeed.comm.torch.build_shm_op` returns None for an op marked
    incompatible, and DeepSpeed then uses torch.distributed for every collective, as it does on GPUs."""
    import deepspeed.ops

    ops = deepspeed.ops.__dict__.get("__compatible_ops__")
    if ops is None:  # not probed yet: probing compiles test programs for every op; only build_shm_op reads it
        ops = deepspeed.ops.__compatible_ops__ = {}
    for name in UNUSED_OPS:
        ops[name] = False


def _stamp() -> dict:
    import deepspeed
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": sys.version.split()[0]}


def load_prebuilt(name: str, root: Path = PREBUILT) -> bool:
    """Register the library `prebuild` left in `root` as DeepSpeed's loaded op: no compiler, no lock.
    False (and nothing registered) when it is absent or was built for other torch/DeepSpeed versions."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    lib, stamp = root / name / f"{name}.so", root / name / "dolly-train-stamp.json"
    if name in OpBuilder._loaded_ops:
        return True
    if not (lib.is_file() and stamp.is_file()) or json.loads(stamp.read_text()) != _stamp():
        return False
    spec = importlib.util.spec_from_file_location(name, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    OpBuilder._loaded_ops[name] = module
    return True


def holders(path: Path) -> list[int]:
    """Pids of the processes on this machine that hold `path` open (torch's FileBaton keeps its fd open
    for as long as the build runs)."""
    target, pids = str(path.resolve()), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def check_locks(names: list[str], root: Path) -> None:
    """Fail fast, naming the file, when a lock of an op this run will build was left by a killed build."""
    for name in names:
        lock = root / name / "lock"
        if lock.exists() and not holders(lock):
            raise StaleLockError(
                f"{lock}: a stale torch-extensions lock (no process holds it; a build of DeepSpeed's {name} op "
                f"was killed). DeepSpeed would wait on it forever: delete it (rm {lock}) and rerun")


def extensions_dir(run_name: str) -> Path:
    """TORCH_EXTENSIONS_DIR when set; else a per-run dir, so no other run's build or lock is ever waited on."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "dolly-train-torch-extensions" / run_name


def preflight(cfg) -> None:
    """The driver's early check (no DeepSpeed import): a stale lock of an op this run would JIT-build here."""
    jit = [name for name in ops_needed(cfg) if not (PREBUILT / name / f"{name}.so").is_file()]
    check_locks(jit, extensions_dir(cfg.checkpoint.run_name))


def prepare(cfg) -> None:
    """Call in each process before DeepSpeed starts (`deepspeed.initialize` / `init_distributed`)."""
    skip_unused_ops()
    jit = [name for name in ops_needed(cfg) if not load_prebuilt(name)]
    if jit:
        root = extensions_dir(cfg.checkpoint.run_name)
        os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
        check_locks(jit, root)
        log.info(f"DeepSpeed op(s) {jit} are not prebuilt (scripts/install.sh DS_OPS=...): building them into {root}")


def prebuild(names: list[str], root: Path = PREBUILT, march: str | None = None) -> None:
    """Build each op once with DeepSpeed's own builder into `root` (install/image-build time). `march`: the CPU
    target (`x86-64-v3` = AVX2) instead of DeepSpeed's `-march=native`, which would tie an image's library to
    the build machine's CPU (its AVX-512 faults on nodes without it)."""
    from deepspeed.accelerator import get_accelerator

    for name in names:
        builder = get_accelerator().create_op_builder(_BUILDERS[name])
        if march:
            builder.cpu_arch = lambda: f"-march={march}"
            builder.simd_width = lambda: _SIMD[march]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
        check_locks([name], root)
        builder.jit_load(verbose=False)
        (root / name / "dolly-train-stamp.json").write_text(json.dumps(_stamp()))
        print(f"==> DeepSpeed op {name} prebuilt in {root / name}")


_BUILDERS = {"cpu_adam": "CPUAdamBuilder"}
_SIMD = {"x86-64-v3": "-D__AVX256__", "x86-64-v4": "-D__AVX512__", "armv8-a": "-D__NEON__"}  # DeepSpeed's simd.h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.ds_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("prebuild", help="build DeepSpeed ops into the environment (scripts/install.sh runs it)")
    b.add_argument("ops", nargs="+", choices=sorted(_BUILDERS))
    b.add_argument("--dir", type=Path, default=PREBUILT, help=f"default: {PREBUILT}")
    b.add_argument("--march", choices=sorted(_SIMD), help="CPU target (default: the build machine's, -march=native)")
    args = p.parse_args(argv)
    try:
        prebuild(args.ops, args.dir, args.march)
    except StaleLockError as e:
        print(f"trainer.ds_ops: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
