"""vLLM's LoRA path against the merged export, teacher-forced (issue 25): the log-probability each engine gives every
prompt token, for the merged folder, and for base + adapter with and without the LoRARequest (the base alone).
Greedy continuations of a random-weight model diverge at the first near-tie, so the comparison is on prompt
log-probs: the adapter path must reproduce the merged model's change from the base, |adapter - merged| far below
|base - merged|.

    python bench/lora_path_check.py --merged RUN/export --base MODEL --adapter RUN/export-adapter --data DATA --out F
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompt_logprobs(llm, prompts, lora=None) -> list[list[float]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=lora, use_tqdm=False)
    rows = []
    for p, o in zip(prompts, outs):
        rows.append([next(iter(d.values())).logprob if d else 0.0 for d in o.prompt_logprobs[1:]]
                    if len(p) > 1 else [])
    return rows


def gaps(a, b) -> dict:
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return {"mean_abs": statistics.fmean(diffs), "max_abs": max(diffs), "tokens": len(diffs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merged", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True, help="a prepared data dir (test.jsonl)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", help="both engines' dtype (float32: no rounding of the merge)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from evaluator.generate import shutdown
    from trainer.prompt import PromptEncoder

    enc = PromptEncoder(args.base)
    recs = [json.loads(x) for x in Path(args.data, "test.jsonl").read_text().splitlines()[: args.prompts]]
    prompts = [e.input_ids[:512] for e in enc.encode_examples(recs)]
    common = dict(dtype=args.dtype, enforce_eager=True, gpu_memory_utilization=0.85, max_model_len=1024,
                  skip_tokenizer_init=True, seed=0)
    llm = LLM(model=args.merged, **common)
    merged = prompt_logprobs(llm, prompts)
    shutdown(llm)  # the engine's processes and their GPU memory, before the second engine starts
    del llm
    gc.collect()
    llm = LLM(model=args.base, enable_lora=True, max_lora_rank=16, max_loras=1, **common)
    adapter = prompt_logprobs(llm, prompts, LoRARequest("adapter", 1, args.adapter))
    base = prompt_logprobs(llm, prompts)
    result = {"adapter_vs_merged": gaps(adapter, merged), "base_vs_merged": gaps(base, merged),
              "prompts": len(prompts), "dtype": args.dtype}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
