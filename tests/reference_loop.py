"""A deliberately plain fine-tuning loop: the oracle that tests/test_reference_loop.py checks `dolly-train train`
against, step by step.

No Ray, no DeepSpeed, and none of the recipe's model, optimizer, scheduler or loss code: the tiny model as
transformers builds it, every example's forward pass on its own (no packing, no attention masks, no padding),
the response-only loss written out, `torch.optim.AdamW` with its decay groups chosen by parameter name, the LR
schedule as the README states it, gradient clipping by hand. One process stands for all the workers: the
step's gradient is the mean over every response token of every example the step's micro-batches hold, whoever
holds them.

Shared with the recipe, on purpose: the batch plan (`trainer.data.packing.plan_epoch`: which examples make up
each optimizer step), which both sides must agree on and which tests/test_packing.py tests on its own.

fp32 on the CPU. What a weights-only resume loses (Adam's moments and step count) is modelled explicitly:
`restart_adam_at` replaces the optimizer with a fresh one after that step, as a resume from a weights-only
checkpoint does.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.data.packing import plan_epoch

IGNORE = -100
# Parameters that get no weight decay, by name: Mistral's RMSNorm weights (and any bias). Everything else -
# the embedding (tied to the LM head) and every linear weight - decays.
NO_DECAY = ("norm.weight", ".bias")


def documented_lr(step: int, lr: float, warmup: int, decay: str, min_ratio: float, schedule_steps: int) -> float:
    """The LR of optimizer step `step` (1-based) as README.md states it: lr x step / warmup_steps during the
    warm-up; then from lr down towards min_lr_ratio x lr along a cosine (or a line) that ends after step
    `schedule_steps`, the length fixed when the run started; then held there."""
    if step <= warmup:
        return lr * step / warmup
    if decay == "constant":
        return lr
    t = min(1.0, (step - 1 - warmup) / max(1, schedule_steps - warmup))
    shape = (1 + math.cos(math.pi * t)) / 2 if decay == "cosine" else 1 - t
    return lr * (min_ratio + (1 - min_ratio) * shape)


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    fingerprint: int  # crc32 of the step's batches, as the recipe logs it (data position)
    epoch: int
    step_in_epoch: int  # optimizer steps done in `epoch`, this one included
    steps_per_epoch: int


@dataclass
class ReferenceRun:
    steps: list[StepRecord] = field(default_factory=list)
    val_loss: dict[int, float] = field(default_factory=dict)  # step -> validation loss after it
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # final parameters by name
    state_at: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> parameters after it
    decay_names: list[str] = field(default_factory=list)


def load_split(data_dir: Path, split: str) -> list[dict]:
    from datasets import load_from_disk

    ds = load_from_disk(str(Path(data_dir) / "tokenized" / split))
    return ds.select_columns(["input_ids", "labels"]).to_list()


def _example_loss(model, ex: dict) -> tuple[torch.Tensor, int]:
    """Sum of the cross-entropy over the example's response tokens, and how many there are."""
    ids = torch.tensor(ex["input_ids"])[None]
    labels = torch.tensor(ex["labels"])
    logits = model(input_ids=ids).logits[0, :-1]  # position t predicts token t + 1
    target = labels[1:]
    keep = target != IGNORE
    return F.cross_entropy(logits[keep].float(), target[keep], reduction="sum"), int(keep.sum())


def run_reference(model_dir: Path, data_dir: Path, *, steps: int, world_size: int, accumulation: int,
                  micro_batch_size: int, max_length: int, packing: bool, seed: int, lr: float,
                  weight_decay: float, betas: tuple[float, float], eps: float, grad_clip: float, warmup: int,
                  decay: str, min_lr_ratio: float, schedule_steps: int | None = None,
                  restart_adam_at: int | None = None, eval_at: tuple[int, ...] = (),
                  states_at: tuple[int, ...] = ()) -> ReferenceRun:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    train, val = load_split(data_dir, "train"), load_split(data_dir, "validation")
    lengths = [len(e["input_ids"]) for e in train]
    n_labels = [sum(1 for t in e["labels"][1:] if t != IGNORE) for e in train]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    params = dict(model.named_parameters())  # the tied LM head is the embedding: one parameter

    def new_adam() -> torch.optim.AdamW:
        decay_p = [p for n, p in params.items() if not n.endswith(NO_DECAY)]
        rest = [p for n, p in params.items() if n.endswith(NO_DECAY)]
        return torch.optim.AdamW([{"params": decay_p, "weight_decay": weight_decay},
                                  {"params": rest, "weight_decay": 0.0}],
                                 lr=lr, betas=betas, eps=eps, foreach=False)

    out = ReferenceRun(decay_names=[n for n in params if not n.endswith(NO_DECAY)])
    adam = new_adam()
    multiple = world_size * accumulation
    schedule_steps = schedule_steps or steps
    step, epoch = 0, 0
    while step < steps:
        plan = plan_epoch(lengths, max_length, packing, micro_batch_size, seed, epoch, multiple)
        per_epoch = len(plan.batches) // multiple
        for s in range(per_epoch):
            if step >= steps:
                break
            step += 1
            batches = plan.batches[s * multiple:(s + 1) * multiple]
            examples = [i for b in batches for row in b for i in row]
            total_labels = sum(n_labels[i] for i in examples)
            adam.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for i in examples:
                ce, _ = _example_loss(model, train[i])
                (ce / total_labels).backward()
                loss_sum += ce.item()
            grads = [p.grad for p in params.values() if p.grad is not None]
            norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
            if grad_clip > 0 and norm > grad_clip:
                for g in grads:
                    g.mul_(grad_clip / (norm + 1e-6))
            step_lr = documented_lr(step, lr, warmup, decay, min_lr_ratio, schedule_steps)
            for group in adam.param_groups:
                group["lr"] = step_lr
            adam.step()
            out.steps.append(StepRecord(step, loss_sum / total_labels, step_lr, norm,
                                        zlib.crc32(repr(batches).encode()), epoch, s + 1, per_epoch))
            if step in eval_at:
                out.val_loss[step] = validation_loss(model, val)
            if step in states_at:
                out.state_at[step] = {n: p.detach().clone() for n, p in params.items()}
            if restart_adam_at == step:
                adam = new_adam()  # a weights-only checkpoint keeps the weights, not Adam's moments
        epoch += 1
    out.state = {n: p.detach().clone() for n, p in params.items()}
    return out


@torch.no_grad()
def validation_loss(model, examples: list[dict]) -> float:
    """Mean cross-entropy over every response token of the validation split."""
    total, n = 0.0, 0
    for ex in examples:
        ce, k = _example_loss(model, ex)
        total += ce.item()
        n += k
    return total / max(n, 1)
