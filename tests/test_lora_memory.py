"""The LoRA memory preflight counts what autograd really keeps (issue 25: the estimate within 3% of the peak), and
the merged export takes the base's size on disk.

Oracle: PyTorch's own saved-tensor hooks on a real Mistral-architecture decoder with peft's adapters, in bf16 on
this CPU. Every tensor autograd saves for backward passes through the hook; distinct storages are summed (a view
saved twice is one allocation), the model's parameters left out. The estimate's `layer_saved_bytes` must equal
that count exactly, for dropout on and off, for all linears and for a subset, with a head size other than
hidden / heads so every dimension enters on its own. On a GPU the only difference is dropout's mask (a bool
there, the scaled noise here: `mask_bytes`), which the GPU record checks through the measured peak.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer import config as C


def _count_saved_bytes(model, input_ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    assert hidden.requires_grad  # the count is of a graph that trains the adapters
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj", "down_proj"], ["o_proj", "up_proj"]])
def test_lora_activation_count_equals_autograds_saved_tensors(dropout, targets):
    from peft import get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from trainer import lora

    mc = MistralConfig(vocab_size=512, hidden_size=192, intermediate_size=544, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=40, max_position_embeddings=256)
    mc._attn_implementation = "sdpa"
    cfg = C.load("cpu-tiny-lora", ["scaling.use_gpu=true", "model.precision=bf16", "model.activation_checkpointing=false", "lora.r=4",
                                   f"lora.dropout={dropout}", f"lora.target_modules=[{', '.join(targets)}]"])
    torch.manual_seed(0)
    model = MistralForCausalLM(mc).to(torch.bfloat16)
    model.requires_grad_(False)
    model = get_peft_model(model, lora.peft_config(cfg)).base_model.model.to(torch.bfloat16)
    model.train()
    T = 96
    saved = _count_saved_bytes(model, torch.randint(0, 512, (1, T)))

    n = sum(p.numel() for p in model.parameters())
    weights, grads, optimizer, held, recompute, extra = lora.memory_terms(cfg, mc, n, 1, 2, T, device_type="cpu")
    assert held == saved, f"estimate {held / T:.1f} vs autograd {saved / T:.1f} bytes per token"
    assert recompute == 0 and extra == 0
    # every layer past the first (whose input needs no gradient) keeps the same per-token bytes
    layer = lora.layer_saved_bytes(cfg, mc, 2, 2)
    first = lora.layer_saved_bytes(cfg, mc, 2, 2, input_requires_grad=False)
    assert first < layer
    # on CUDA dropout keeps a 1-byte bool mask per adapted input element instead of the 2-byte noise
    cuda = lora.layer_saved_bytes(cfg, mc, 2, 1)
    inputs = sum(i for _, i, _ in lora.adapted_linears(cfg, mc))
    assert layer - cuda == (inputs if dropout else 0)


def test_preflight_of_the_lora_presets_counts_the_buckets_and_checkpointing_peak():
    """The two terms the H100 record of 2026-12-06 (run10) showed missing: DeepSpeed's ZeRO-2 reduction buckets and,
    under checkpointing, the larger of the LM head and one recomputed layer rather than both."""
    from transformers import MistralConfig

    from trainer.memory import GIB, estimate_gpu_memory, reduction_buckets

    mc = MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    n = 7_248_023_552
    for preset in ("mistral-7b-lora-1gpu", "mistral-7b-qlora-24gb"):
        cfg = C.load(preset)
        est = estimate_gpu_memory(cfg, mc, n, 1)
        ds = cfg.deepspeed
        assert reduction_buckets(cfg, 2) == (2 if ds.overlap_comm else 1) * ds.reduce_bucket_size * 2
        parts = est.weights_gib + est.gradients_gib + est.optimizer_gib + est.buffers_gib
        if cfg.model.activation_checkpointing:  # QLoRA: the recomputed layer outweighs the LM head
            assert est.total_gib < parts + est.activations_gib + est.lm_head_gib
            assert est.total_gib == pytest.approx(parts + est.activations_gib)
        else:
            assert est.total_gib == pytest.approx(parts + est.activations_gib + est.lm_head_gib)
        assert est.buffers_gib * GIB >= reduction_buckets(cfg, 2)
    # a bucket size on the command line changes the estimate by exactly its buffers
    a = estimate_gpu_memory(C.load("mistral-7b-lora-1gpu"), mc, n, 1)
    b = estimate_gpu_memory(C.load("mistral-7b-lora-1gpu", ["deepspeed.reduce_bucket_size=500000000"]), mc, n, 1)
    assert (b.total_gib - a.total_gib) * GIB == pytest.approx(2 * 2 * (500_000_000 - a_bucket()))


def a_bucket() -> int:
    return C.load("mistral-7b-lora-1gpu").deepspeed.reduce_bucket_size


def test_merged_export_keeps_the_base_models_dtype(tmp_path, tiny_model_dir):
    """The merge runs in fp32, but the merged folder is written in the base's own dtype (bf16 for Mistral-7B): the
    H100 lease of 2026-12-06 wrote the 7B merge as a 29 GB fp32 folder, because loading in fp32 rewrites the
    config's dtype that the export then read."""
    from peft import get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from trainer import lora

    base_dir = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base_dir)
    cfg = C.load("cpu-tiny-lora", [f"model.path={base_dir}"])
    live = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), lora.peft_config(cfg))
    adapter = lora.adapter_state(live.base_model.model.state_dict())
    assert adapter
    merged_dir = lora.export_adapter_and_merged(cfg, adapter, tmp_path / "export", tokenizer_from=tiny_model_dir)[1]
    config = json.loads((merged_dir / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    dtypes = set()
    for f in merged_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    assert dtypes == {"BF16"}
