"""The model DeepSpeed trains: a Hugging Face causal LM with the response-only loss.

Loss: cross-entropy over response tokens only. The LM head runs only on positions that have a label: with
Dolly's prompts that skips the 32,768-way projection for most prompt tokens. The recipe scales the sum so the
step's gradient is the mean over every response token of the global batch (trainer/recipe.py, train_step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import ConfigError
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


def decays(p: torch.nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies: to matrices (linear weights, the embedding), never to vectors (norm
    weights, biases). Decided on the parameter's real shape: under ZeRO-3, `zero.Init` has already replaced every
    tensor with an empty partition of shape (0,) and keeps the shape in `ds_shape` (with `p.ndim`, no parameter
    decayed under ZeRO-3)."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def restore_fp32_rope(model: torch.nn.Module) -> int:
    """Give every rotary embedding back its fp32 inverse frequencies; returns how many were recomputed.

    Under ZeRO-3, `from_pretrained` builds the model inside `deepspeed.zero.Init`, which turns every floating
    tensor created there into the training dtype - the rotary `inv_freq` buffer too (bf16: 0.6484 for
    0.6494). RoPE angles are position x inv_freq, so at position 2,000 the error reaches radians: the model
    would train with other positions than the exported folder and vLLM (fp32 inv_freq) use. Found on an H200 as
    a 1.2 logit gap between the live engine and its export. A fresh rotary module, built outside zero.Init,
    recomputes the buffers in fp32 with the model's own RoPE settings."""
    n = 0
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.dtype != torch.float32 and hasattr(module, "config"):
            fresh = type(module)(module.config)
            module.inv_freq = fresh.inv_freq.to(inv.device)
            if hasattr(fresh, "original_inv_freq"):
                module.original_inv_freq = fresh.original_inv_freq.to(inv.device)
            n += 1
    return n


def set_checkpointed_layers(model: torch.nn.Module, n: int | None) -> None:
    """Selective activation checkpointing: only the first `n` decoder layers recompute in backward (None: all).
    transformers checkpoints a layer when its `gradient_checkpointing` flag is set; the rest keep activations."""
    if n is None:
        return
    layers = model.model.layers
    if n > len(layers):
        raise ConfigError(f"model.activation_checkpointing_layers={n}: the model has only {len(layers)} decoder layers")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
