"""Packed rows under flex_attention: does every example get the loss - and the gradients - it gets alone?

    python bench/flex_packing_check.py --device cuda --json-out flex.json        # forward + backward (GPU)
    python bench/flex_packing_check.py --device cpu --forward-only               # the CPU: flex has no backward

The GPU presets train with `attn_implementation: flex_attention` and a document `BlockMask` over packed rows.
This runs the recipe's own path for that - the model loaded with flex_attention (transformers compiles flex), a
batch built by `trainer.data.packing.collate_packed`, the mask from `attention_inputs` - on two rows of
`--max-length` tokens: three examples packed in the first, one example and padding in the second. The oracle
is each example alone, through SDPA with plain causal attention: another kernel, no mask, no packing.

Per example it reports the loss (mean over its response tokens) both ways and, unless --forward-only, the
gradient of that example's loss with respect to every parameter both ways: the largest difference relative to
the largest gradient entry. `--model` takes a Hugging Face folder (tests: the tiny model with the real
tokenizer) and `--data` a `dolly-train prepare` folder; without them a random-init model of the tiny
architecture and random token ids are used (the GPU machine has neither mistral-common nor datasets).
tests/test_packing.py runs it (the CPU forward always, forward and backward where CUDA is available).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.data.packing import attention_inputs, collate_packed  # noqa: E402

IGNORE = -100


def random_examples(n: int, vocab: int, seed: int) -> list[dict]:
    """Mistral-instruct-shaped examples: <s>, a prompt (label -100), a response (labelled), </s>."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, response = rng.randint(8, 40), rng.randint(4, 30)
        ids = [1] + [rng.randint(5, vocab - 1) for _ in range(prompt + response)] + [2]
        labels = [IGNORE] * (1 + prompt) + ids[1 + prompt:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def load_examples(data: str | None, n: int, vocab: int, max_length: int) -> list[dict]:
    if data is None:
        return random_examples(n, vocab, seed=0)
    from datasets import load_from_disk

    rows = load_from_disk(str(Path(data) / "tokenized" / "train")).select_columns(["input_ids", "labels"]).to_list()
    rows = [r for r in rows if len(r["input_ids"]) <= max_length // 3]
    return rows[:n]


def load_model(path: str | None, attn: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    else:
        from trainer.tiny_model import TINY_MISTRAL

        torch.manual_seed(0)
        cfg = MistralConfig(**TINY_MISTRAL, attn_implementation=attn)
        model = MistralForCausalLM(cfg).to(dtype)
    return model.to(device).train()


def example_losses(logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """Mean response-token loss of every example of a collated batch, in row order."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target, doc = batch["labels"][:, 1:], batch["doc_ids"][:, 1:]
    keep = target != IGNORE
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    out = []
    for b in range(target.shape[0]):
        for d in sorted(set(doc[b][keep[b]].tolist())):
            sel = keep[b] & (doc[b] == d)
            out.append(nll[b][sel].mean())
    return out


def alone_loss(model, ex: dict, device) -> torch.Tensor:
    ids = torch.tensor(ex["input_ids"], device=device)[None]
    labels = torch.tensor(ex["labels"], device=device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    target = labels[1:]
    keep = target != IGNORE
    return F.cross_entropy(logits[keep], target[keep])


def flat_grad(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in model.parameters()])


def check(model_path: str | None, data: str | None, device: str, dtype: str, max_length: int,
          forward_only: bool) -> dict:
    dev = torch.device(device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    flex = load_model(model_path, "flex_attention", dt, dev)
    sdpa = load_model(model_path, "sdpa", dt, dev)
    sdpa.load_state_dict(flex.state_dict())
    ex = load_examples(data, 4, flex.config.vocab_size, max_length)
    assert sum(len(e["input_ids"]) for e in ex[:3]) <= max_length, "the examples do not fit one row"
    batch = {k: v.to(dev) for k, v in collate_packed([ex[:3], ex[3:4]], max_length).items()}
    kwargs = attention_inputs(batch, "flex_attention", dt)
    with torch.set_grad_enabled(not forward_only):
        packed = example_losses(flex(input_ids=batch["input_ids"], **kwargs).logits, batch)
        assert len(packed) == 4
        results = []
        for i, e in enumerate(ex):
            alone = alone_loss(sdpa, e, dev)
            r = {"tokens": len(e["input_ids"]), "loss_packed": packed[i].item(), "loss_alone": alone.item(),
                 "loss_diff": abs(packed[i].item() - alone.item())}
            if not forward_only:
                flex.zero_grad(set_to_none=True)
                sdpa.zero_grad(set_to_none=True)
                packed[i].backward(retain_graph=True)
                alone.backward()
                g_packed, g_alone = flat_grad(flex), flat_grad(sdpa)
                scale = g_alone.abs().max().item()
                r["grad_max_abs"] = scale
                r["grad_rel_diff"] = (g_packed - g_alone).abs().max().item() / max(scale, 1e-30)
            results.append(r)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "dtype": dtype, "max_length": max_length, "forward_only": forward_only,
        "model": model_path or "random-init tiny Mistral", "data": data or "random token ids",
        "examples": results,
        "max_loss_diff": max(r["loss_diff"] for r in results),
        "max_grad_rel_diff": None if forward_only else max(r["grad_rel_diff"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 shows equality to rounding; bf16 is what the GPU presets train in")
    p.add_argument("--model", help="a Hugging Face model folder (default: random-init tiny Mistral)")
    p.add_argument("--data", help="a `dolly-train prepare` folder (default: random token ids)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--forward-only", action="store_true", help="skip the gradients (the CPU has no flex backward)")
    p.add_argument("--json-out", help="write the result here too")
    a = p.parse_args(argv)
    result = check(a.model, a.data, a.device, a.dtype, a.max_length, a.forward_only)
    for i, r in enumerate(result["examples"]):
        grad = "" if a.forward_only else f"  grad rel diff {r['grad_rel_diff']:.2e}"
        print(f"example {i} ({r['tokens']} tokens): loss packed {r['loss_packed']:.6f} alone {r['loss_alone']:.6f} "
              f"diff {r['loss_diff']:.2e}{grad}")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
