"""The model DeepSpeed trains: a Hugging Face causal LM with the response-only loss.

Loss: cross-entropy over response tokens only. The LM head runs only on positions that have a label: with
Dolly's prompts that skips the 32,768-way projection for most prompt tokens. The recipe scales the sum so the
step's gradient is the mean over every response token of the global batch (trainer/recipe.py, train_step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.packing import attention_inputs
from trainer.prompt import IGNORE_INDEX


class CausalLMWithResponseLoss(torch.nn.Module):
    """HF causal LM + a loss that runs the LM head only where a label exists. Returns
    (sum of token losses x `scale`, number of label tokens)."""

    def __init__(self, model: torch.nn.Module, attn_implementation: str):
        super().__init__()
        self.model = model
        self.attn_implementation = attn_implementation

    def forward(self, input_ids, labels, position_ids, doc_ids, scale):
        extra = attention_inputs({"doc_ids": doc_ids, "position_ids": position_ids}, self.attn_implementation,
                                 self.model.dtype)
        hidden = self.model.model(input_ids=input_ids, use_cache=False, **extra).last_hidden_state  # (B, L, H)
        targets = labels[:, 1:]  # token t predicts t+1
        keep = targets != IGNORE_INDEX
        h = hidden[:, :-1][keep]  # (N, H) only positions with a label
        logits = self.model.lm_head(h).float()  # (N, V)
        loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
        return loss_sum * scale, keep.sum()
