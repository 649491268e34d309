"""Packing tokenized examples into fixed-length rows, and the batches the model sees.

Packed mode: examples are placed into rows of `max_length` tokens by best-fit decreasing (after a seeded
shuffle, so each epoch packs differently); position ids restart at every example; attention never crosses an
example boundary: a block-diagonal causal mask for `sdpa`/`eager`, a document `BlockMask` for
`flex_attention`. Position ids alone do NOT keep examples apart in transformers' sdpa/eager path (measured:
per-example loss off by up to 0.29), hence the explicit mask.

Padded mode (for comparison): examples in shuffled order, `micro_batch_size` per batch, padded to the
longest in the batch.

Sharding: every worker computes the same epoch plan (same seed, same rows) and takes rows `rank::world`.
The plan is padded with empty rows to a multiple of world x micro-batch x accumulation, so all workers run
the same number of steps and every example is seen exactly once per epoch.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from trainer.prompt import IGNORE_INDEX

PAD_ID = 0  # Mistral has no pad token; padded positions carry label -100 and their own mask segment.


def pack_rows(lengths: Sequence[int], max_length: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Best-fit decreasing: returns, per row, the indices of the examples in it.

    `order` (a permutation of indices) breaks ties between equal lengths, so a shuffled order gives a
    different but equally tight packing. O(n log n)."""
    order = list(range(len(lengths))) if order is None else list(order)
    # stable sort: longest first, ties in `order`
    items = sorted(order, key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in items:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length {max_length}")
        if n <= 0:
            raise ValueError(f"example {i} is empty")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, r = free.pop(k)
            rows[r].append(i)
            cap -= n
        else:
            r = len(rows)
            rows.append([i])
            cap = max_length - n
        if cap > 0:
            bisect.insort(free, (cap, r))
    return rows


@dataclass
class EpochPlan:
    """What every worker agrees on for one epoch: micro-batches, each a list of rows, each row a list of
    example indices (a packed row holds several examples; a padded-mode row holds one; [] is an empty row)."""

    batches: list[list[list[int]]]
    real_tokens: int
    capacity_tokens: int

    @property
    def efficiency(self) -> float:
        """Real tokens / tokens the model computes on (packed: rows x max_length; padded: batch x longest)."""
        return self.real_tokens / max(self.capacity_tokens, 1)


def plan_epoch(lengths: Sequence[int], max_length: int, packing: bool, micro_batch_size: int, seed: int,
               epoch: int, multiple: int) -> EpochPlan:
    """Micro-batches for one epoch, padded with empty batches to a multiple of `multiple`
    (world size x gradient accumulation) so every worker runs the same number of optimizer steps."""
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if packing:
        rows = pack_rows(lengths, max_length, order)
        random.Random(seed * 7_919 + epoch).shuffle(rows)  # best-fit emits the longest rows first: mix them
        capacity = len(rows) * max_length
    else:
        rows = [[i] for i in order]
        capacity = 0
    batches = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    if not packing:
        capacity = sum(max(lengths[r[0]] for r in b) * len(b) for b in batches)
    batches += [[[]] for _ in range(-len(batches) % multiple)]
    return EpochPlan(batches, sum(lengths), capacity)


def shard_batches(batches: list, rank: int, world_size: int) -> list:
    return batches[rank::world_size]


# ---- collation --------------------------------------------------------------------------------------

def collate_packed(examples_per_row: list[list[dict]], max_length: int) -> dict:
    """Rows of examples -> tensors of shape (B, max_length). `doc_ids` numbers the examples in a row
    (padding gets -1) and drives the attention mask."""
    B = len(examples_per_row)
    input_ids = torch.full((B, max_length), PAD_ID, dtype=torch.long)
    labels = torch.full((B, max_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, max_length), dtype=torch.long)
    doc_ids = torch.full((B, max_length), -1, dtype=torch.long)
    for b, row in enumerate(examples_per_row):
        pos = 0
        for d, ex in enumerate(row):
            n = len(ex["input_ids"])
            input_ids[b, pos : pos + n] = torch.as_tensor(ex["input_ids"])
            labels[b, pos : pos + n] = torch.as_tensor(ex["labels"])
            position_ids[b, pos : pos + n] = torch.arange(n)
            doc_ids[b, pos : pos + n] = d
            pos += n
        position_ids[b, pos:] = torch.arange(max_length - pos)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


def collate_padded(examples: list[dict]) -> dict:
    """Right-padded batch to the longest example; padding is its own segment (doc -1). No examples (the plan's
    padding batch, `[[]]`) give one row of padding, as a packed padding batch does: every worker runs every
    micro-step, and the row adds nothing to the loss (a batch of 0 rows failed in the model's reshape)."""
    if not examples:
        return collate_packed([[]], 1)
    L = max((len(ex["input_ids"]) for ex in examples), default=1)
    return collate_packed([[ex] for ex in examples], L)


def block_causal_mask(doc_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1, L, L) mask: query i sees key j iff j <= i and both are in the same example.
    Padding positions (doc -1) see only themselves, so no row of the mask is empty (no NaN in softmax).
    bool for sdpa; pass a float dtype for the additive form `eager` needs."""
    L = doc_ids.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    pad = doc_ids < 0
    eye = torch.eye(L, dtype=torch.bool, device=doc_ids.device)
    mask = (same & ~pad[:, :, None]) | (pad[:, :, None] & eye)
    mask = (mask & causal)[:, None]
    if dtype is None or dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def flex_block_mask(doc_ids: torch.Tensor):
    """Document-causal BlockMask for flex_attention (the fast packed path on GPUs)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = doc_ids.shape

    def document_causal(b, h, q, kv):
        same = doc_ids[b, q] == doc_ids[b, kv]
        return (q >= kv) & (same | (q == kv))

    return create_block_mask(document_causal, B=B, H=None, Q_LEN=L, KV_LEN=L, device=doc_ids.device)


def attention_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype) -> dict:
    """The model kwargs that keep packed examples apart under the chosen attention kernel."""
    doc_ids = batch["doc_ids"]
    if attn_implementation == "flex_attention":
        mask = flex_block_mask(doc_ids)
    elif attn_implementation == "eager":
        mask = block_causal_mask(doc_ids, dtype)
    else:
        mask = block_causal_mask(doc_ids)
    return {"attention_mask": mask, "position_ids": batch["position_ids"]}
