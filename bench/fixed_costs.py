"""Fixed costs: what every first run, every test and every CI run pays before and after the real work.

    python bench/fixed_costs.py                 # all figures, on the tiny model (make bench-fixed)
    python bench/fixed_costs.py --skip-vllm     # without the vLLM engine start
    python bench/fixed_costs.py --json out.json
    python bench/fixed_costs.py --cli           # only the CLI's answers (--help, refusals), median of 5 runs each

Figures (seconds, wall): import time of each CLI; `ray.init` of a local cluster; then one 4-step
`dolly-train train --config cpu-tiny` on 300 synthetic records with 2 Ray workers, end to end, split at the
lines it prints (Ray started, worker group started, first step, export, exit); then the recipe alone at world
size 1 (DeepSpeed init, first step, checkpoint, export, as `bench/train_throughput.py` runs it); and the
vLLM engine start on the CPU (`dolly-eval run`'s own `engine_start_seconds`). The train run's bar is 30 s
(exit status 1 when missed). Every Ray session, temp file and torch extensions build goes to a temp dir
removed at the end; TORCH_EXTENSIONS_DIR starts empty, as on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAR_TRAIN_S = 30.0

RECIPE = """
import json, os, sys, time
t = {}
t0 = time.perf_counter()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import deepspeed, torch
from trainer import config as C
from trainer.recipe import FullFinetuneRecipe
try:
    from trainer.contexts import LocalContext
except ImportError:  # a checkout from before trainer/contexts.py (the "before" figures)
    from trainer.recipe import LocalContext
t["import (torch, transformers, deepspeed)"] = time.perf_counter() - t0
model, data, out = sys.argv[1:4]
cfg = C.load("cpu-tiny", [f"model.path={model}", f"data.path={data}", f"checkpoint.storage_path={out}",
                          "scaling.num_workers=1", "schedule.max_steps=1", "logging.eval_every_steps=100"])
try:
    from trainer import ds_ops
    ds_ops.prepare(cfg)
except ImportError:  # a checkout from before trainer/ds_ops.py (the "before" figures)
    pass
t0 = time.perf_counter()
deepspeed.init_distributed(dist_backend="gloo")  # on CPU: where DeepSpeed JIT-builds its shm comm op
t["DeepSpeed init_distributed"] = time.perf_counter() - t0
recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
# setup() as the product runs it, with deepspeed.initialize (inside _setup_engine) timed apart
setup_engine = recipe._setup_engine
def _timed_engine(model):
    t0 = time.perf_counter()
    setup_engine(model)
    t["deepspeed.initialize"] = time.perf_counter() - t0
recipe._setup_engine = _timed_engine
t0 = time.perf_counter()
recipe.setup()
t["data + model load (rest of setup)"] = time.perf_counter() - t0 - t["deepspeed.initialize"]
plan = recipe._plan(0)
micro, labels, _ = recipe.step_batches(plan, 0)
t0 = time.perf_counter()
recipe.train_step(micro, labels)
t["first step"] = time.perf_counter() - t0
recipe.progress.global_step = 1
t0 = time.perf_counter()
recipe.save_checkpoint()
t["checkpoint"] = time.perf_counter() - t0
t0 = time.perf_counter()
recipe.export(f"{out}/export")
t["export"] = time.perf_counter() - t0
print("RECIPE-TIMES " + json.dumps(t), flush=True)
"""

# (label, pattern in the run's output) in the order they appear
MARKS = [
    ("ray", r"Started a local Ray instance"),
    ("wg_begin", r"Attempting to start training worker group"),
    ("wg_end", r"Started training worker group"),
    ("step1", r"\[dolly-train\] step=1 "),
    ("export", r"exported Hugging Face model"),
    ("done", r"\[dolly-train\] done"),
]


def timed(cmd: list[str], env: dict, timeout: float = 900) -> tuple[float, list[tuple[float, str]], int]:
    """Run `cmd`, stamping each output line with the seconds since the start."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return time.perf_counter() - t0, lines, rc


def import_times(env: dict) -> dict:
    out = {}
    for name, mod in (("dolly-train --help", "trainer.cli"), ("dolly-eval --help", "evaluator.cli")):
        wall, _, rc = timed([sys.executable, "-m", mod, "--help"], env)
        out[f"import: {name}"] = wall if rc == 0 else None
    return out


def cli_times(env: dict, work: Path, runs: int = 5) -> dict:
    """Median wall time of the commands that must answer at once (tests/test_structure.py bounds them)."""
    model = work / "no-model"
    cases = {
        "dolly-train --help": ["-m", "trainer.cli", "--help"],
        "dolly-eval --help": ["-m", "evaluator.cli", "--help"],
        "dolly-train train --help": ["-m", "trainer.cli", "train", "--help"],
        "dolly-train submit --help": ["-m", "trainer.cli", "submit", "--help"],
        "dolly-train train, missing model dir (refused)": [
            "-m", "trainer.cli", "train", "--config", "cpu-tiny", f"model.path={model}", f"data.path={work / 'no-data'}",
            f"checkpoint.storage_path={work / 'runs-cli'}", "--verbose"],
        "dolly-train export --checkpoint /nonexistent (refused)": [
            "-m", "trainer.cli", "export", "--checkpoint", "/nonexistent", "--out", str(work / "no-export")],
    }
    out = {}
    for label, args in cases.items():
        walls = []
        for _ in range(runs):
            wall, _, _ = timed([sys.executable, *args], env)
            walls.append(wall)
        out[f"cli: {label}"] = statistics.median(walls)
    return out


def ray_start(env: dict) -> dict:
    # with the settings `dolly-train train` gives its own local cluster (none in checkouts from before them)
    code = ("import time, ray\n"
            "try:\n    from trainer.launch import LOCAL_RAY_SYSTEM_CONFIG as c\nexcept ImportError:\n    c = {}\n"
            "t=time.perf_counter(); ray.init(num_cpus=2, include_dashboard=False, _system_config=c)\n"
            "s=time.perf_counter(); ray.shutdown(); print('RAY', s-t, time.perf_counter()-s)")
    _, lines, _ = timed([sys.executable, "-c", code], env)
    for _, line in lines:
        if line.startswith("RAY "):
            start, stop = map(float, line.split()[1:])
            return {"ray.init (local, 2 CPUs)": start, "ray.shutdown": stop}
    return {}


def train_run(env: dict, work: Path) -> tuple[dict, float, bool]:
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--config", "cpu-tiny", f"model.path={work / 'tiny'}",
           f"data.path={work / 'data'}", f"checkpoint.storage_path={work / 'runs'}", "checkpoint.run_name=fixed",
           "schedule.max_steps=4", "logging.every_steps=1", "logging.eval_every_steps=100",
           "--verbose"]  # Ray's own lines too (the marks below); the default prints only dolly-train's
    wall, lines, rc = timed(cmd, env)
    if rc != 0:
        print("\n".join(line for _, line in lines[-40:]), file=sys.stderr)
        raise SystemExit(f"the train run failed (exit {rc})")
    at = {}
    for label, pattern in MARKS:
        at[label] = next((t for t, line in lines if re.search(pattern, line)), None)
    rows = [json.loads(x) for x in (work / "runs" / "fixed" / "metrics.jsonl").read_text().split("\n") if x.strip()]
    first = next(r for r in rows if r["kind"] == "train")
    built = any("built successfully" in line for _, line in lines)
    step1 = first["step_time_s"]
    figures = {
        "train: start -> Ray started": at["ray"],
        "train: Ray started -> worker group requested": at["wg_begin"] - at["ray"],
        "train: worker group start": at["wg_end"] - at["wg_begin"],
        "train: worker setup (data, model, DeepSpeed init)": at["step1"] - at["wg_end"] - step1,
        "train: first step (2 workers)": step1,
        "train: steps 2-4, checkpoint, export": at["export"] - at["step1"],
        "train: teardown (export -> command exits)": wall - at["export"],
    }
    return figures, wall, built


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-vllm", action="store_true", help="leave out the vLLM engine start")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--cli", action="store_true", help="only the CLI figures (--help and early refusals)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dolly-fixed-"))
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "RAY_TMPDIR": str(work / "ray"),
           "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions"), "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for d in ("tmp", "ray"):
        (work / d).mkdir()
    try:
        figures: dict = {}
        if args.cli:
            figures.update(cli_times(env, work))
            width = max(map(len, figures))
            for k, v in figures.items():
                print(f"{k:{width}s} {v:6.2f} s")
            print(f"load average: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs")
            if args.json:
                Path(args.json).write_text(json.dumps({"figures": figures, "loadavg": os.getloadavg()}, indent=2))
            return 0
        figures.update(import_times(env))
        figures.update(ray_start(env))
        for cmd in (["init-tiny-model", "--out", str(work / "tiny")],
                    ["prepare", "--source", "synthetic", "--num-examples", "300", "--tokenizer", str(work / "tiny"),
                     "--max-length", "512", "--val-size", "20", "--test-size", "20", "--seed", "0",
                     "--out", str(work / "data")]):
            subprocess.run([sys.executable, "-m", "trainer.cli", *cmd], env=env, check=True, capture_output=True)
        train, wall, built = train_run(env, work)
        figures.update(train)
        _, lines, rc = timed([sys.executable, "-c", RECIPE, str(work / "tiny"), str(work / "data"),
                              str(work / "recipe")], env)
        recipe = next((json.loads(line.split(" ", 1)[1]) for _, line in lines if line.startswith("RECIPE-TIMES")),
                      None)
        if recipe is None:
            print("\n".join(line for _, line in lines[-30:]), file=sys.stderr)
        else:
            figures.update({f"recipe (world size 1): {k}": v for k, v in recipe.items()})
        if not args.skip_vllm:
            out = work / "eval"
            _, lines, rc = timed([sys.executable, "-m", "evaluator.cli", "run", "--config",
                                  str(REPO / "evaluator" / "configs" / "cpu-tiny.yaml"), "--model",
                                  str(work / "tiny"), "--data", str(work / "data"), "--out", str(out),
                                  "--max-new-tokens", "8"], env)
            if rc == 0:
                m = json.loads((out / "metrics.json").read_text())
                figures["vLLM engine start (CPU)"] = m["generation"]["throughput"]["engine_start_seconds"]
        figures["train: 4-step run, end to end"] = wall
        width = max(map(len, figures))
        for k, v in figures.items():
            print(f"{k:{width}s} {'n/a' if v is None else f'{v:7.1f} s'}")
        print(f"DeepSpeed op JIT-built during the train run: {'yes' if built else 'no'}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs")
        if args.json:
            Path(args.json).write_text(json.dumps({"figures": figures, "op_built": built,
                                                   "loadavg": os.getloadavg()}, indent=2))
        ok = wall <= BAR_TRAIN_S
        print(f"4-step train run: {wall:.1f} s (bar {BAR_TRAIN_S:.0f} s): {'ok' if ok else 'MISSED'}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
