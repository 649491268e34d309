"""The `lora:` config section (issue 25): bad combinations are refused with the knob named, before any model is
loaded; the vLLM rank limit is vLLM's own; the evaluator's adapter check refuses what vLLM would."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

from evaluator import adapter as eval_adapter
from evaluator.config import EvalInputError
from trainer import config as C
from trainer.cli import main


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.method=qlora", "deepspeed.stage=3"], "lora.method: qlora runs under deepspeed.stage 2 only"),
        (["lora.method=qlora", "deepspeed.stage=3", "deepspeed.offload_params=true"], "qlora runs under deepspeed.stage 2"),
        (["lora.method=lora", "lora.r=1024"], "lora.r: 1024 is above the maximum 512"),
        (["lora.method=lora", "lora.r=0"], "lora.r: 0 is below the minimum 1"),
        (["lora.method=dora"], "lora.method: 'dora' is not one of"),
        (["lora.method=lora", "checkpoint.save_optimizer_state=false"], "checkpoint.save_optimizer_state: must stay true"),
        (["lora.method=lora", "lora.target_modules=[all-linear, q_proj]"], "'all-linear' stands alone"),
        (["lora.method=lora", "lora.target_modules=[]"], "lora.target_modules: expected a non-empty list"),
        (["lora.method=qlora", "lora.compute_dtype=bf16"], "lora.compute_dtype: bf16 is for GPU workers"),
        (["lora.method=lora", "lora.dropout=1.5"], "lora.dropout: 1.5 is above the maximum 0.9"),
        (["lora.quant_type=int4"], "lora.quant_type: 'int4' is not one of"),
    ],
)
def test_bad_lora_combinations_name_the_knob(overrides, message):
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.load("cpu-tiny", overrides)


def test_qlora_under_zero3_is_refused_in_the_gpu_presets_too():
    with pytest.raises(C.ConfigError, match="qlora runs under deepspeed.stage 2 only"):
        C.load("mistral-7b-qlora-24gb", ["deepspeed.stage=3"])


def test_lora_presets():
    one = C.load("mistral-7b-lora-1gpu")
    assert one.lora.method == "lora" and one.scaling.num_workers == 1 and one.scaling.use_gpu
    assert one.deepspeed.stage == 2 and one.model.precision == "bf16"
    q = C.load("mistral-7b-qlora-24gb")
    assert q.lora.method == "qlora" and q.lora.quant_type == "nf4" and q.lora.double_quant
    assert q.model.activation_checkpointing and q.deepspeed.stage == 2
    multi = C.load("mistral-7b-lora-8gpu")
    assert multi.lora.method == "lora" and multi.scaling.num_workers == 8
    tiny = C.load("cpu-tiny-lora")
    assert tiny.lora.method == "lora" and tiny.model.activation_checkpointing and not tiny.scaling.use_gpu
    assert C.load("cpu-tiny").lora.method == "none"  # the full fine-tune stays the default


def _vllm_max_lora_ranks() -> tuple[int, ...]:
    """vLLM's own list, read from the installed vllm's source (importing vLLM takes 15-50 s here)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed (the eval extra)")
    src = (Path(list(spec.submodule_search_locations)[0]) / "config" / "lora.py").read_text()
    m = re.search(r"^MaxLoRARanks = Literal\[([^\]]*)\]", src, re.M)
    assert m, "vllm/config/lora.py no longer defines MaxLoRARanks: recheck the rank limit"
    return tuple(ast.literal_eval(f"[{m.group(1)}]"))


def test_rank_limit_is_vllms_own():
    ranks = _vllm_max_lora_ranks()
    assert C.VLLM_MAX_LORA_RANKS == ranks == eval_adapter.VLLM_MAX_LORA_RANKS
    lora_r = [f for f in C.dataclasses.fields(C.LoraConfig) if f.name == "r"][0]
    assert lora_r.metadata["maximum"] == max(ranks)
    assert [eval_adapter.max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 256, 257, 512)] == [
        1, 8, 8, 16, 16, 32, 256, 320, 512]


def _train(*args) -> int:
    return main(["train", "--config", "cpu-tiny-lora", *args])


def test_target_modules_the_model_lacks_are_refused_before_loading(tmp_path, capsys, tiny_model_dir,
                                                                   synthetic_data_dir, monkeypatch):
    ok = [f"model.path={tiny_model_dir}", f"data.path={synthetic_data_dir}", f"checkpoint.storage_path={tmp_path}"]
    # if anything tried to load weights, this would fail the test with another message
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the config check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    assert _train(*ok, "lora.target_modules=[q_proj, qkv_proj]") == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: 'qkv_proj' is not a linear layer" in err and "'q_proj'" in err, err
    assert _train(*ok, "lora.target_modules=[lm_head]") == 2
    assert "lm_head cannot take an adapter" in capsys.readouterr().err


def _adapter(tmp_path: Path, **cfg) -> Path:
    d = tmp_path / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **cfg}))
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    return d


def test_eval_adapter_check(tmp_path):
    good = eval_adapter.check_adapter(_adapter(tmp_path))
    assert good["r"] == 8 and good["max_lora_rank"] == 8
    with pytest.raises(EvalInputError, match="modules_to_save"):
        eval_adapter.check_adapter(_adapter(tmp_path / "a", modules_to_save=["lm_head"]))
    with pytest.raises(EvalInputError, match="r=1024"):
        eval_adapter.check_adapter(_adapter(tmp_path / "b", r=1024))
    with pytest.raises(EvalInputError, match="not a PEFT adapter folder"):
        eval_adapter.check_adapter(tmp_path / "missing")


def test_eval_job_passes_an_empty_adapter_as_none(tmp_path):
    """manifests/eval-job*.yaml always pass `--adapter $(ADAPTER_DIR)`; the ConfigMap default is empty = none."""
    import argparse

    from evaluator.config import add_run_arguments, from_args

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    common = ["--model", "m", "--data", "d", "--out", "o"]
    assert from_args(parser.parse_args([*common, "--adapter", ""])).adapter == ""
    assert from_args(parser.parse_args([*common, "--adapter", "a"])).adapter == "a"
    import yaml

    for name in ("eval-job.yaml", "eval-job-cpu.yaml"):  # tests/test_chart_contract.py runs the CPU one for real
        docs = [d for d in yaml.safe_load_all((Path(__file__).parents[1] / "manifests" / name).read_text()) if d]
        assert docs[0]["data"]["ADAPTER_DIR"] == "", name
        tuned = [c for c in docs[1]["spec"]["template"]["spec"]["initContainers"] if c["name"] == "eval-tuned"][0]
        assert tuned["command"][tuned["command"].index("--adapter") + 1] == "$(ADAPTER_DIR)", name
        env = {e["name"]: e for e in tuned["env"]}
        assert env["ADAPTER_DIR"]["valueFrom"]["configMapKeyRef"]["key"] == "ADAPTER_DIR", name
        # the export wait takes it too: with an adapter, MODEL_DIR is the base and the adapter folder is awaited
        wait = [c for c in docs[1]["spec"]["template"]["spec"]["initContainers"] if c["name"] == "wait-export"][0]
        assert wait["command"][wait["command"].index("--adapter") + 1] == "$(ADAPTER_DIR)", name


@pytest.mark.parametrize("targets", ["[all-linear]", "[q_proj, v_proj, down_proj]"])
def test_adapter_size_counted_from_config_equals_peft(tiny_model_dir, targets):
    """The preflight's adapter size (meta device, and the closed form the memory estimate uses) equals what peft
    itself makes trainable on the real model."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer import lora
    from trainer.memory import estimate_gpu_memory

    cfg = C.load("cpu-tiny-lora", [f"model.path={tiny_model_dir}", f"lora.target_modules={targets}"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora.peft_config(cfg))
    want = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    mc = AutoConfig.from_pretrained(tiny_model_dir)
    closed = mc.num_hidden_layers * sum(cfg.lora.r * (i + o) for _, i, o in lora.adapted_linears(cfg, mc))
    assert lora.trainable_count(cfg) == closed == want
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    full, adapter = estimate_gpu_memory(C.load("cpu-tiny", [f"model.path={tiny_model_dir}"]), mc, n, 2), \
        estimate_gpu_memory(cfg, mc, n, 2)
    # fp32 on 2 ZeRO-2 workers: Adam's two moments (8 bytes) over the world size, for the adapter only
    assert adapter.optimizer_gib == pytest.approx(want * 8 / 2 / 2**30)
    assert adapter.gradients_gib < full.gradients_gib / 10 and adapter.optimizer_gib < full.optimizer_gib / 10
