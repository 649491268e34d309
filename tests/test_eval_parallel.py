"""Data-parallel generation (`--data-parallel-size N`): the splitting and merging logic (fast), and N = 2
vLLM engines on the CPU against N = 1 (slow: 36 s on 2 cores with the engine core in each engine's process;
it was ~6 min, and opt-in, while every engine started vLLM's own engine and worker processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from evaluator.config import EngineConfig, EvalInputError, SamplingConfig
from evaluator.generate import Generation
from evaluator.parallel import device_groups, merge, shards


@pytest.mark.parametrize("n, parts", [(10, 2), (11, 3), (3, 3), (1500, 8), (5, 1)])
def test_shards_are_contiguous_near_equal_and_cover_everything(n, parts):
    rs = shards(n, parts)
    assert len(rs) == parts
    assert [i for r in rs for i in r] == list(range(n))
    sizes = [len(r) for r in rs]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def fake_generations(n: int, seeds: list) -> list[Generation]:
    """What one engine would return for n prompts: seed-major request order, distinct token ids."""
    return [Generation(i, s, [100 * i + k for k in range(3)], "length") for s in seeds for i in range(n)]


@pytest.mark.parametrize("seeds", [[None], [0, 1, 2]])
def test_merge_restores_request_order_of_a_single_engine(seeds):
    n, parts = 11, 3
    single = fake_generations(n, seeds)
    rs = shards(n, parts)
    # each engine sees its own prompts, numbered from 0
    per_engine = [[dataclasses.replace(g, prompt_index=g.prompt_index - r.start)
                   for g in single if g.prompt_index in r] for r in rs]
    # the engines' lists arrive in any order within themselves: merge sorts by (seed, prompt)
    per_engine = [list(reversed(p)) for p in per_engine]
    assert merge(per_engine, rs, seeds) == single


def test_merge_refuses_missing_or_duplicate_generations():
    rs = shards(4, 2)
    part = fake_generations(2, [None])
    with pytest.raises(RuntimeError, match="exactly once"):
        merge([part, part[:1]], rs, [None])
    with pytest.raises(RuntimeError, match="exactly once"):
        merge([part, part + part[:1]], rs, [None])


def test_device_groups_for_gpus_and_cpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert device_groups("cuda", 2, 2) == ["4,5", "6,7"]
    assert device_groups("cuda", 4, 1) == ["4", "5", "6", "7"]
    with pytest.raises(EvalInputError, match="needs 6 GPUs; 4 visible"):
        device_groups("cuda", 3, 2)
    if hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        groups = device_groups("cpu", 2, 1)
        if len(cores) >= 2:
            assert len(groups) == 2 and not set(groups[0].split(",")) & set(groups[1].split(","))
        assert device_groups("cpu", len(cores) + 1, 1) == [None] * (len(cores) + 1)


def test_data_parallel_size_is_a_flag_and_config_key(tmp_path):
    from evaluator.cli import build_parser
    from evaluator.config import from_args

    cfg = from_args(build_parser().parse_args(["run", "--model", "m", "--data", "d", "--out", "o",
                                               "--data-parallel-size", "4"]))
    assert cfg.engine.data_parallel_size == 4 and cfg.engine.tensor_parallel_size == 1
    f = tmp_path / "c.yaml"
    f.write_text("engine:\n  data_parallel_size: 0\n")
    with pytest.raises(EvalInputError, match="engine.data_parallel_size: 0 is below the minimum 1"):
        from_args(build_parser().parse_args(["run", "--config", str(f), "--model", "m", "--data", "d", "--out", "o"]))


@pytest.mark.slow
def test_two_engines_give_the_outputs_of_one(tmp_path, tiny_model_dir, synthetic_data_dir, repo):
    """Two engines, each with its engine core in its own process (the CPU default), against one engine laid out
    as vLLM lays it out by default (engine core and worker in processes of their own, --no-in-process): the same
    tokens for every prompt, so neither the split and merge nor the in-process engine core changes an output.
    The two runs also check the terminal (issue 29): quiet, vLLM's engine-core process included; --verbose."""
    outs, metrics, procs = {}, {}, {}
    for n, layout, verbose in ((1, "--no-in-process", []), (2, "--in-process", ["--verbose"])):
        out = tmp_path / f"dp{n}"
        p = subprocess.run([sys.executable, "-m", "evaluator.cli", "run", "--config",
                            str(repo / "evaluator/configs/cpu-tiny.yaml"), "--model", str(tiny_model_dir),
                            "--data", str(synthetic_data_dir), "--out", str(out), "--limit", "12",
                            "--max-new-tokens", "12", "--data-parallel-size", str(n), layout, *verbose],
                           capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, p.stderr[-3000:]
        procs[n] = p
        outs[n] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().split("\n") if line]
        metrics[n] = json.loads((out / "metrics.json").read_text())
    assert [(r["id"], r["output_token_ids"]) for r in outs[2]] == [(r["id"], r["output_token_ids"]) for r in outs[1]]
    assert metrics[1]["engine"]["in_process"] is False and metrics[2]["engine"]["in_process"] is True
    assert [e["prompts"] for e in metrics[2]["engine"]["data_parallel_engines"]] == [6, 6]
    # Quiet: the engine core's own process wrote to eval.log, nothing of it reached the terminal.
    engine_core = re.compile(r"\(EngineCore\w* pid=\d+\) (INFO|WARNING)")
    assert engine_core.search((tmp_path / "dp1" / "eval.log").read_text())
    assert all(line.startswith("[dolly-eval] ") for line in procs[1].stderr.splitlines()), procs[1].stderr
    assert not re.search(r"pid=\d+\)", procs[1].stdout)
    # --verbose: vLLM's lines (each engine process's) on the terminal, no log file.
    assert re.search(r"pid=\d+\) INFO ", procs[2].stdout + procs[2].stderr)
    assert not (tmp_path / "dp2" / "eval.log").exists()


def test_engine_and_sampling_configs_pickle_for_the_engine_processes():
    import pickle

    e, s = EngineConfig(data_parallel_size=2), SamplingConfig(temperature=0.5)
    assert pickle.loads(pickle.dumps(e)) == e and pickle.loads(pickle.dumps(s)) == s
