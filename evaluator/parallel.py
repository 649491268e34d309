"""Data-parallel generation: N independent vLLM engines on one node, each on its own GPU(s).

`engine.data_parallel_size` N > 1 splits the prompts into N contiguous, near-equal shards (`shards`), starts
one process per shard with `CUDA_VISIBLE_DEVICES` set to its own `tensor_parallel_size` GPUs, runs the same
`generate_with` as a single engine there, and merges the generations back into request order (`merge`), so
the rows, ids and seeds are exactly those of N = 1; greedy outputs are the same token ids.

Why independent engines rather than vLLM's own data parallelism (`data_parallel_size` with a DP
coordinator) or Ray Data's LLM processor: a dense 7B model needs no coordination between replicas (vLLM's
DP coordinator exists to keep MoE expert-parallel ranks in lock-step), Ray is not in the GPU evaluator image
and a Ray Data pipeline would be a second framework around one `LLM.generate` call, and N processes with
their own `CUDA_VISIBLE_DEVICES` is the pattern vLLM's offline data-parallel example uses. Each engine
compiles against the same VLLM_CACHE_ROOT, so only the first start of a model is cold.

On the CPU backend the engines share the host: each one is pinned to its own share of the cores
(`VLLM_CPU_OMP_THREADS_BIND`) so that they do not fight over the same ones.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
import traceback

from evaluator.config import EngineConfig, EvalInputError, SamplingConfig
from evaluator.generate import Generation, GenerationRun, generate_with, shutdown, start_engine

log = logging.getLogger("dolly-eval")


def shards(n: int, parts: int) -> list[range]:
    """`parts` contiguous ranges covering 0..n-1, sizes differing by at most one (the first ones larger)."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def merge(parts: list[list[Generation]], ranges: list[range], seeds: list) -> list[Generation]:
    """Per-shard generations (prompt_index local to the shard) -> one list in `LLM.generate`'s request order
    for all prompts: seed-major, then prompt index."""
    order = {s: k for k, s in enumerate(seeds)}
    out = [dataclasses.replace(g, prompt_index=r.start + g.prompt_index)
           for gens, r in zip(parts, ranges, strict=True) for g in gens]
    out.sort(key=lambda g: (order[g.seed], g.prompt_index))
    expected = [(s, i) for s in seeds for i in range(sum(len(r) for r in ranges))]
    if [(g.seed, g.prompt_index) for g in out] != expected:
        raise RuntimeError("data-parallel merge: the engines' generations do not cover every request exactly once")
    return out


def device_groups(device: str, data_parallel: int, tensor_parallel: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each engine (GPUs), or the cores each engine binds to (CPU backend)."""
    if device == "cpu":
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        if len(cores) < data_parallel:
            return [None] * data_parallel  # fewer cores than engines: let them share
        per = len(cores) // data_parallel
        return [",".join(map(str, cores[k * per : (k + 1) * per])) for k in range(data_parallel)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        gpus = [g for g in visible.split(",") if g.strip()]
    else:
        import torch

        gpus = [str(k) for k in range(torch.cuda.device_count())]
    need = data_parallel * tensor_parallel
    if len(gpus) < need:
        raise EvalInputError(f"engine.data_parallel_size {data_parallel} x tensor_parallel_size {tensor_parallel} "
                             f"needs {need} GPUs; {len(gpus)} visible ({','.join(gpus) or 'none'})")
    return [",".join(gpus[k * tensor_parallel : (k + 1) * tensor_parallel]) for k in range(data_parallel)]


def _worker(rank: int, device: str, group: str | None, model_dir: str, prompt_ids, example_ids, eos_id: int,
            engine: EngineConfig, sampling: SamplingConfig, conn) -> None:
    """One engine in its own process: its GPUs (or cores) only, the same generate_with as N = 1."""
    try:
        if group is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND" if device == "cpu" else "CUDA_VISIBLE_DEVICES"] = group
        eng = start_engine(model_dir, dataclasses.replace(engine, data_parallel_size=1))
        try:
            gens, elapsed = generate_with(eng.llm, prompt_ids, example_ids, eos_id, sampling)
        finally:
            shutdown(eng.llm)
        conn.send(("ok", [dataclasses.astuple(g) for g in gens], eng.start_s, elapsed, eng.vllm_version,
                   eng.kwargs, eng.cache))
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises)
        conn.send(("error", f"engine {rank}: {traceback.format_exc()}"))
    finally:
        conn.close()


def generate_data_parallel(model_dir: str, prompt_ids: list[list[int]], example_ids: list[str], eos_id: int,
                           engine: EngineConfig, sampling: SamplingConfig) -> GenerationRun:
    from evaluator.generate import _device

    n = engine.data_parallel_size
    if len(prompt_ids) < n:
        raise EvalInputError(f"engine.data_parallel_size {n} is more than the {len(prompt_ids)} prompts")
    device = _device()
    groups = device_groups(device, n, engine.tensor_parallel_size)
    ranges = shards(len(prompt_ids), n)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA_VISIBLE_DEVICES is read at its start
    procs, conns = [], []
    t0 = time.perf_counter()
    for rank, (r, group) in enumerate(zip(ranges, groups)):
        parent, child = ctx.Pipe(duplex=False)
        # not a daemon: each engine starts its own EngineCore process
        p = ctx.Process(target=_worker, name=f"dolly-eval-dp{rank}", daemon=False,
                        args=(rank, device, group, model_dir, prompt_ids[r.start : r.stop],
                              example_ids[r.start : r.stop], eos_id, engine, sampling, child))
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
        log.info("data-parallel engine %d: prompts %d-%d on %s %s", rank, r.start, r.stop - 1,
                 "cores" if device == "cpu" else "GPUs", group or "shared")
    results, errors = [], []
    for rank, (p, conn) in enumerate(zip(procs, conns)):
        try:
            results.append(conn.recv())
        except EOFError:
            results.append(("error", f"engine {rank}: process exited without a result"))
        p.join()
        if results[-1][0] == "error":
            errors.append(results[-1][1])
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError("data-parallel generation failed:\n" + "\n".join(errors))
    parts = [[Generation(*t) for t in res[1]] for res in results]
    gens = merge(parts, ranges, sampling.run_seeds())
    per_engine = [{"engine": k, "prompts": len(r), "devices": g, "engine_start_seconds": round(res[2], 3),
                   "generate_seconds": round(res[3], 3)} for k, (r, g, res) in enumerate(zip(ranges, groups, results))]
    # The engines run side by side: the phase lasts as long as its slowest engine.
    start_s, gen_s = max(res[2] for res in results), max(res[3] for res in results)
    log.info("data-parallel generation: %d engines, %.1f s wall", n, wall)
    return GenerationRun(gens, start_s, gen_s, device, results[0][4], {**results[0][5], "data_parallel_size": n},
                         results[0][6], per_engine)
