"""The exported folder computes what the trained engine computed: in transformers, and served by vLLM.

    python bench/export_logits.py train --model DIR --data DIR --work DIR [--config mistral-7b-zero3-1gpu]
    python bench/export_logits.py check --work DIR [--eval-config evaluator/configs/mistral-7b-h200.yaml]

`train` runs the recipe at world size 1 (no Ray; NCCL on a GPU, gloo on a CPU) for `--steps` optimizer steps
on the prepared data dir, at a learning rate high enough (`--lr`, no warm-up) that the trained model is
measurably not the base model. It then takes the live DeepSpeed engine's logits on `--probes` validation rows
(ZeRO-3 parameters gathered) and writes them with the row ids to WORK/trained.pt, and exports the engine with
`FullFinetuneRecipe.export` to WORK/export (the same call `dolly-train train` and `dolly-train export` make).

`check` runs in a fresh process, so no training state holds GPU memory:
- transformers: the export loaded with `from_pretrained` in the training dtype and attention kernel, on the
  training device. Its logits must equal the engine's within bf16 rounding (`--hf-atol`, `--hf-rtol`).
- the base model, loaded the same way, gives the distance training moved the model (the yardstick below).
- vLLM: the export served by the evaluator's engine settings; for every probe position, the log-probability
  of the actual next token (`prompt_logprobs`) against the engine's log-softmax. Different kernels and a bf16
  pipeline: the mean absolute difference must stay under `--vllm-mean-atol` and under half the base model's
  distance from the trained one, so vLLM serving the base weights (or any other model) fails the check.
Writes WORK/export_logits.json and prints it; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train(args) -> int:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from trainer import config as C
    from trainer import ds_ops
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"model.path={args.model}", f"data.path={args.data}", f"checkpoint.storage_path={work / 'runs'}",
                 "checkpoint.run_name=export-logits", "scaling.num_workers=1", f"schedule.max_steps={args.steps}",
                 f"optim.lr={args.lr}", "schedule.warmup_steps=0", "schedule.decay=constant",
                 "checkpoint.every_steps=100000", "checkpoint.save_optimizer_state=false", "checkpoint.export=false",
                 "logging.eval_every_steps=100000", *args.override]
    cfg = C.load(args.config, overrides)
    gpu = cfg.scaling.use_gpu
    ds_ops.prepare(cfg)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    if gpu:
        torch.cuda.set_device(0)
    recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
    recipe.setup()
    t0 = time.perf_counter()
    recipe.train()
    train_s = time.perf_counter() - t0
    rows = [e["input_ids"][: args.probe_tokens] for e in recipe.val_examples[: args.probes]]
    if len(rows) < args.probes:
        raise SystemExit(f"{args.data}: only {len(rows)} validation rows, --probes {args.probes}")
    module = recipe.engine.module.model
    recipe.engine.eval()
    # The probes are plain causal rows, not packed ones: flex_attention outside the training step (no document
    # BlockMask, a length that is not a block multiple) failed on the H200 on 2026-12-02, so both sides of the
    # comparison (this engine and `check`'s transformers load) use SDPA. The check is about the weights.
    attn = cfg.model.attn_implementation
    if attn == "flex_attention":
        attn = "sdpa"
        module.set_attn_implementation(attn)
    logits = []
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(module.parameters()),
                                                            enabled=cfg.deepspeed.stage == 3):
        for ids in rows:
            x = torch.tensor([ids], device=recipe.device)
            logits.append(module(input_ids=x, use_cache=False).logits[0].float().cpu())
    rope = [str(m.inv_freq.dtype) for m in module.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    torch.save({"rows": rows, "logits": logits, "rope_inv_freq_dtype": rope, "precision": cfg.model.precision,
                "attn_implementation": attn, "device": recipe.device.type,
                "base_model": str(args.model), "steps": args.steps, "lr": args.lr}, work / "trained.pt")
    t0 = time.perf_counter()
    recipe.export(work / "export")
    export_s = time.perf_counter() - t0
    (work / "train.json").write_text(json.dumps({"train_s": train_s, "export_s": export_s, "steps": args.steps,
                                                 "preset": args.config, "overrides": overrides}, indent=2))
    print(f"trained {args.steps} steps in {train_s:.1f}s, exported in {export_s:.1f}s -> {work / 'export'}",
          flush=True)
    recipe.cleanup()
    return 0


def _hf_logits(folder, rows, dtype, attn, device) -> list:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn).to(device).eval()
    with torch.no_grad():
        out = [model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()
               for ids in rows]
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _next_token_logprobs(logits: list, rows: list) -> "torch.Tensor":
    """log p(row[t+1] | row[:t+1]) at every position, all rows concatenated."""
    import torch

    return torch.cat([torch.log_softmax(lg[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
                      for lg, ids in zip(logits, rows)])


def check(args) -> int:
    import torch

    work = Path(args.work)
    saved = torch.load(work / "trained.pt")
    rows, trained = saved["rows"], saved["logits"]
    dtype = torch.bfloat16 if saved["precision"] == "bf16" else torch.float32
    device, attn = saved["device"], saved["attn_implementation"]
    result: dict = {"engine_rope_inv_freq_dtype": saved.get("rope_inv_freq_dtype"), "probes": len(rows), "tokens": sum(len(r) for r in rows), "precision": saved["precision"],
                    "steps": saved["steps"], "lr": saved["lr"], "device": device}

    exported = _hf_logits(work / "export", rows, dtype, attn, device)
    hf_diff = max(float((a - b).abs().max()) for a, b in zip(exported, trained))
    hf_mean = float(torch.cat([(a - b).abs().flatten() for a, b in zip(exported, trained)]).mean())
    hf_ok = all(torch.allclose(a, b, rtol=args.hf_rtol, atol=args.hf_atol) for a, b in zip(exported, trained))
    base = _hf_logits(saved["base_model"], rows, dtype, attn, device)
    lp_trained = _next_token_logprobs(trained, rows)
    lp_base = _next_token_logprobs(base, rows)
    base_distance = float((lp_base - lp_trained).abs().mean())
    # what bf16 arithmetic alone moves: the same exported weights computed in fp32
    noise = None
    if dtype != torch.float32:
        fp32 = _hf_logits(work / "export", rows, torch.float32, attn, device)
        lp_fp32, lp_exported = _next_token_logprobs(fp32, rows), _next_token_logprobs(exported, rows)
        noise = {"max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(fp32, exported)),
                 "mean_abs_logprob_diff": float((lp_fp32 - lp_exported).abs().mean())}
    result["transformers"] = {"max_abs_logit_diff": hf_diff, "mean_abs_logit_diff": hf_mean, "rtol": args.hf_rtol,
                              "atol": args.hf_atol, "ok": hf_ok, "bf16_vs_fp32_same_weights": noise,
                              "base_vs_trained_mean_abs_logprob_diff": base_distance}
    if args.skip_vllm:
        result["vllm"] = "skipped (--skip-vllm)"
        result["ok"] = hf_ok
        return _write(work, result)

    from evaluator import config as EC
    from evaluator.generate import _device, engine_kwargs, shutdown
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = EC.from_args(argparse.Namespace(config=args.eval_config, model=str(work / "export"), data=str(work),
                                          out=str(work / "unused")))
    kw = engine_kwargs(str(work / "export"), cfg.engine, _device())
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in rows], params, use_tqdm=False)
    got = []
    for out, ids in zip(outs, rows):
        # position 0 has no prediction; position t holds {token_id: Logprob} for the prompt's token t
        got += [float(pos[tok].logprob) for pos, tok in zip(out.prompt_logprobs[1:], ids[1:])]
    shutdown(llm)
    lp_vllm = torch.tensor(got)
    vllm_diff = (lp_vllm - lp_trained).abs()
    vllm_mean = float(vllm_diff.mean())
    vllm_ok = vllm_mean <= args.vllm_mean_atol and vllm_mean < 0.5 * base_distance
    result["vllm"] = {"engine_start_s": start_s, "dtype": kw["dtype"], "mean_abs_logprob_diff": vllm_mean,
                      "max_abs_logprob_diff": float(vllm_diff.max()), "mean_atol": args.vllm_mean_atol,
                      "must_be_below_half_of_base_distance": 0.5 * base_distance, "ok": vllm_ok}
    result["ok"] = hf_ok and vllm_ok
    return _write(work, result)


def _write(work: Path, result: dict) -> int:
    train_json = work / "train.json"
    if train_json.is_file():
        result["train"] = json.loads(train_json.read_text())
    text = json.dumps(result, indent=2)
    tmp = work / "export_logits.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, work / "export_logits.json")
    print(text, flush=True)
    return 0 if result["ok"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a few steps, save the engine's probe logits, export")
    t.add_argument("--model", required=True, help="base model folder")
    t.add_argument("--data", required=True, help="a `dolly-train prepare` dir")
    t.add_argument("--work", required=True, help="folder for trained.pt, export/, export_logits.json")
    t.add_argument("--config", default="mistral-7b-zero3-1gpu", help="training preset")
    t.add_argument("--steps", type=int, default=3, help="optimizer steps")
    t.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (no warm-up): moves the model")
    t.add_argument("--probes", type=int, default=8, help="validation rows probed")
    t.add_argument("--probe-tokens", type=int, default=256, help="tokens per probe row (its first ones)")
    t.add_argument("--override", action="append", default=[], help="extra training config override")
    c = sub.add_parser("check", help="compare the export (transformers, vLLM) with the trained engine")
    c.add_argument("--work", required=True)
    c.add_argument("--eval-config", default="evaluator/configs/mistral-7b-h200.yaml",
                   help="dolly-eval config whose engine settings serve the export")
    c.add_argument("--hf-rtol", type=float, default=1.6e-2, help="bf16: 2^-6, two roundings of 2^-8 relative")
    c.add_argument("--hf-atol", type=float, default=1e-2)
    c.add_argument("--vllm-mean-atol", type=float, default=0.05,
                   help="mean |log p_vLLM - log p_engine| per token, in nats")
    c.add_argument("--skip-vllm", action="store_true", help="transformers checks only (no vLLM installed)")
    args = p.parse_args()
    return train(args) if args.command == "train" else check(args)


if __name__ == "__main__":
    raise SystemExit(main())
