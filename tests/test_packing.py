"""Packing: exactly-once sharding, and packed rows computing exactly what unpacked examples compute."""

from __future__ import annotations

import random

import pytest
import torch

from trainer.data.packing import (
    attention_inputs,
    block_causal_mask,
    collate_packed,
    collate_padded,
    pack_rows,
    plan_epoch,
    shard_batches,
)
from trainer.prompt import IGNORE_INDEX, PromptEncoder


def test_pack_rows_fits_and_keeps_every_example():
    rng = random.Random(0)
    lengths = [rng.randint(1, 700) for _ in range(3000)]
    rows = pack_rows(lengths, 1024)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 1024 for r in rows)
    # best-fit decreasing is within a few percent of the lower bound on rows
    lower = -(-sum(lengths) // 1024)
    assert len(rows) <= lower * 1.03 + 1
    with pytest.raises(ValueError, match="more than max_length"):
        pack_rows([10, 2000], 1024)


def test_every_example_once_per_epoch_on_every_world_size():
    rng = random.Random(1)
    lengths = [rng.randint(5, 500) for _ in range(1001)]
    for packing in (True, False):
        for world, accum in ((1, 1), (2, 1), (3, 2), (8, 4)):
            plan = plan_epoch(lengths, 512, packing, micro_batch_size=2, seed=7, epoch=3, multiple=world * accum)
            assert len(plan.batches) % (world * accum) == 0
            seen = [i for r in range(world) for b in shard_batches(plan.batches, r, world) for row in b for i in row]
            assert sorted(seen) == list(range(len(lengths)))
            assert len({len(shard_batches(plan.batches, r, world)) for r in range(world)}) == 1
    a = plan_epoch(lengths, 512, True, 2, seed=7, epoch=0, multiple=2).batches
    assert a == plan_epoch(lengths, 512, True, 2, seed=7, epoch=0, multiple=2).batches  # deterministic
    assert a != plan_epoch(lengths, 512, True, 2, seed=7, epoch=1, multiple=2).batches  # reshuffled per epoch


def test_mask_is_block_diagonal_causal():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    m = block_causal_mask(doc)[0, 0]
    assert m.shape == (7, 7)
    assert m[2].tolist() == [True, True, True, False, False, False, False]
    assert m[4].tolist() == [False, False, False, True, True, False, False]  # example 1 cannot see example 0
    assert m[6].tolist() == [False] * 6 + [True]  # padding sees only itself: no empty softmax row
    add = block_causal_mask(doc, torch.float32)[0, 0]
    assert (add[m] == 0).all() and (add[~m] < -1e30).all()


def _per_example_losses(model, batch, attn):
    """Per-example mean response-token loss, from one forward of a (packed or padded) batch."""
    out = model(input_ids=batch["input_ids"], **attention_inputs(batch, attn, torch.float32)).logits
    logp = torch.log_softmax(out[:, :-1].float(), -1)
    tgt = batch["labels"][:, 1:]
    doc = batch["doc_ids"][:, 1:]
    keep = tgt != IGNORE_INDEX
    nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    losses = []
    for b in range(tgt.shape[0]):
        for d in sorted(set(doc[b][keep[b]].tolist())):
            sel = keep[b] & (doc[b] == d)
            losses.append(nll[b][sel].mean().item())
    return losses


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    enc = PromptEncoder(tiny_model_dir)
    records = [
        {"instruction": "What is the capital of Avalor?", "context": "", "response": "Brightwater, on the coast."},
        {"instruction": "Summarize.", "context": "Zentar is a small country. It exports tin.", "response": "Zentar exports tin."},
        {"instruction": "List three colours.", "context": "", "response": "Red, green and blue."},
        {"instruction": "Classify: whale", "context": "", "response": "Mammal."},
    ]
    ex = [{"input_ids": e.input_ids, "labels": e.labels} for e in enc.encode_examples(records)]
    with torch.no_grad():
        # packed: examples 0-2 in one row (+ padding), example 3 in a second row
        packed = _per_example_losses(model, collate_packed([[ex[0], ex[1], ex[2]], [ex[3]]], 128), attn)
        alone = [_per_example_losses(model, collate_padded([e]), attn)[0] for e in ex]
    assert len(packed) == 4
    assert packed == pytest.approx(alone, abs=2e-5), (packed, alone)


def test_packing_efficiency_beats_padding():
    rng = random.Random(3)
    # a long-tailed length profile like Dolly's (median ~120 tokens, tail past 1,000)
    lengths = [min(2048, int(rng.lognormvariate(4.8, 0.8)) + 10) for _ in range(4000)]
    packed = plan_epoch(lengths, 2048, True, 2, 0, 0, 1)
    padded = plan_epoch(lengths, 2048, False, 16, 0, 0, 1)
    assert packed.efficiency > 0.97
    assert padded.efficiency < packed.efficiency


def test_padding_batches_of_padded_mode_collate_to_a_row_the_model_runs(tmp_path, tiny_model_dir):
    """data.packing=false with world size x accumulation > 1: the plan pads the epoch (and the validation split)
    with empty batches `[[]]`. Each must become one row of padding that the model runs, with no loss and no
    label (a batch of 0 rows failed in the model's reshape: 'cannot reshape tensor of 0 elements')."""
    from transformers import AutoModelForCausalLM

    from trainer import config as C
    from trainer.contexts import LocalContext
    from trainer.model import CausalLMWithResponseLoss
    from trainer.recipe import FullFinetuneRecipe

    plan = plan_epoch([5, 7, 9], 16, False, micro_batch_size=1, seed=0, epoch=0, multiple=4)
    assert plan.batches[-1] == [[]]
    cfg = C.load("cpu-tiny", [f"model.path={tiny_model_dir}", f"checkpoint.storage_path={tmp_path}",
                              "data.packing=false"])
    batch = FullFinetuneRecipe(cfg, LocalContext(tmp_path)).collate(plan.batches[-1], examples=[])
    assert batch["input_ids"].shape == (1, 1) and (batch["labels"] == IGNORE_INDEX).all()
    assert (batch["doc_ids"] == -1).all()
    model = CausalLMWithResponseLoss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "sdpa")
    loss, n = model(batch["input_ids"], batch["labels"], batch["position_ids"], batch["doc_ids"], 1.0)
    assert n.item() == 0 and loss.item() == 0.0
    loss.backward()  # a worker holding only padding still takes part in the step
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# ---- flex_attention (the GPU presets' kernel) ---------------------------------------------------------

def _flex_check(repo, tmp_path, *args) -> dict:
    import json
    import subprocess
    import sys

    out = tmp_path / "flex.json"
    proc = subprocess.run([sys.executable, str(repo / "bench" / "flex_packing_check.py"), "--json-out", str(out),
                           *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_packed_rows_under_flex_attention_give_each_example_its_own_loss_cpu(repo, tmp_path, tiny_model_dir,
                                                                             synthetic_data_dir):
    """The recipe's flex path (transformers compiles flex_attention; the document BlockMask from
    attention_inputs) on a packed row of three real examples and a row of one example + padding: every
    example's loss equals that example alone through SDPA with plain causal attention (another kernel, no mask).
    Forward only: flex_attention has no backward on the CPU (the GPU test below does both). The compile costs
    ~20-40 s on 2 cores."""
    r = _flex_check(repo, tmp_path, "--device", "cpu", "--forward-only", "--model", str(tiny_model_dir),
                    "--data", str(synthetic_data_dir))
    assert len(r["examples"]) == 4 and all(e["tokens"] > 10 for e in r["examples"])
    assert r["max_loss_diff"] < 2e-5, r["examples"]
    assert len({round(e["loss_alone"], 3) for e in r["examples"]}) == 4  # four different examples


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: flex_attention has no backward on the CPU (the CPU test above checks "
                           "the forward). On a GPU: python bench/flex_packing_check.py --device cuda")
def test_packed_rows_under_flex_attention_give_each_example_its_own_gradients_gpu(repo, tmp_path):
    """Forward and backward on the GPU, fp32: each example's loss and its gradient with respect to every
    parameter, packed under flex vs alone under SDPA. Measured on one H100 (2026-12-06, torch 2.11.0+cu130,
    transformers 5.17.0; docs/benchmarks/run11-h100-flex): loss difference <= 9.5e-7, gradient relative
    difference <= 8.2e-7. The bounds are ten times that: a mask that let one example see another moves both by
    orders of magnitude more (the SDPA test above: up to 0.29 in the loss)."""
    r = _flex_check(repo, tmp_path, "--device", "cuda")
    assert not r["forward_only"] and len(r["examples"]) == 4
    assert r["max_loss_diff"] < 1e-5, r["examples"]
    assert r["max_grad_rel_diff"] < 1e-5, r["examples"]
