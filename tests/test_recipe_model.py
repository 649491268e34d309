"""The model the recipe trains is the model the preset describes: loaded with `from_pretrained` (the
product's path, which the GPU benchmark now shares), in training mode, with activation checkpointing in
effect when the config asks for it.

Found on an H200: `from_pretrained` returns the model in eval mode, where transformers skips activation
checkpointing, so the checkpointing preset kept every activation and ran out of memory in its first forward
pass, while the benchmark (then building the model with `from_config`, which leaves it in training mode)
peaked 20 GiB lower. Checkpointing shows on the CPU as the decoder layers running their forward twice per
micro-batch (once in the forward pass, once recomputed in the backward pass)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

import pytest

# Every leg below trains the tiny model in ONE subprocess (ZeRO-3, one worker, gloo): the imports, the process
# group and the compile are paid once for the file's slow checks. A leg: (name, checkpointing on, steps, overrides).
LEGS = [
    ("ac", True, 1, []),
    ("noac", False, 1, []),
    ("sel", True, 2, ["model.activation_checkpointing_layers=1"]),
    ("compiled", True, 2, ["model.activation_checkpointing_layers=1", "model.compile=torch"]),
    ("too_deep", True, 0, ["model.activation_checkpointing_layers=99"]),
]

SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from torch._dynamo.utils import counters
    from trainer import config as C
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    def decayed(recipe):
        # what DeepSpeed's ZeRO-3 optimizer applies weight decay to: its parameter sub-groups, each mapped to a
        # group of the AdamW it wraps, by that group's weight_decay
        opt = recipe.optimizer
        names = {id(p): n for n, p in recipe.engine.module.named_parameters()}
        return sorted(names[id(p)] for i, sub in enumerate(opt.fp16_groups) for p in sub
                      if opt.optimizer.param_groups[opt.sub_group_to_group_id[i]]["weight_decay"] > 0)

    model_dir, data_dir, out = sys.argv[1:4]
    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    for name, ac, steps, overrides in json.loads(sys.argv[5]):
        cfg = C.load("cpu-tiny", [f"model.path={model_dir}", f"data.path={data_dir}",
                                  f"checkpoint.storage_path={out}/{name}", "scaling.num_workers=1",
                                  "schedule.max_steps=2", "deepspeed.stage=3", f"model.activation_checkpointing={ac}",
                                  "batch.gradient_accumulation_steps=2", *overrides])
        recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
        try:
            recipe.setup()
        except Exception as e:  # a leg that must be refused
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        hf = recipe.engine.module.model
        calls = []
        hooks = [hf.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(m.training))]
        per_layer = [0] * len(hf.model.layers)
        for i, layer in enumerate(hf.model.layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda m, a, i=i: per_layer.__setitem__(i, per_layer[i] + 1)))
        plan = recipe._plan(0)
        losses, first = [], None
        for step in range(steps):
            micro, labels, _ = recipe.step_batches(plan, step)
            losses.append(float(recipe.train_step(micro, labels)["loss_scaled_sum"]))
            if first is None:
                first = {"layer_calls": len(calls), "micro_batches": len(micro), "calls_per_layer": list(per_layer)}
        for h in hooks:
            h.remove()
        result[name] = {
            **first, "losses": losses,
            "module_training": [m.training for m in recipe.engine.module.modules()].count(False) == 0,
            "compiled": recipe.engine.is_compiled, "graphs": counters["stats"]["unique_graphs"],
            "keys": sorted(recipe.engine.module.state_dict()),
            "decayed": decayed(recipe),
        }
        del recipe
    # The end-of-run export runs in a watchdog phase: stalled there, the worker fails naming it (limit 2 s).
    import time
    from trainer.watchdog import PhaseTimeout
    os.environ["DOLLY_TEST_STALL"] = "0:export"
    cfg = C.load("cpu-tiny", [f"model.path={model_dir}", f"data.path={data_dir}", "deepspeed.stage=3",
                              f"checkpoint.storage_path={out}/stall", "scaling.num_workers=1"])
    recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
    try:
        recipe.setup()
        recipe.setup_limit_s = 2  # what watchdog.setup_s=2 would give the phases after setup
        t0 = time.monotonic()
        recipe.export(f"{out}/stalled-export")
        result["export_stall"] = {"error": None}
    except PhaseTimeout as e:
        result["export_stall"] = {"error": str(e).splitlines()[0], "seconds": time.monotonic() - t0}
    finally:
        recipe.cleanup()
    print("RESULT " + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def legs(tmp_path_factory, tiny_model_dir, synthetic_data_dir) -> dict:
    import json

    out = tmp_path_factory.mktemp("recipe-legs")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(synthetic_data_dir), str(out),
                           "29541", json.dumps(LEGS)], capture_output=True, text=True, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[-1].removeprefix("RESULT "))


@pytest.mark.slow
def test_from_pretrained_model_trains_in_training_mode_with_checkpointing(legs):
    with_ac, without = legs["ac"], legs["noac"]
    assert with_ac["module_training"] and without["module_training"]
    # one forward per micro-batch without checkpointing; a recompute per micro-batch with it
    assert without["layer_calls"] == without["micro_batches"] == 2
    assert with_ac["layer_calls"] == 2 * with_ac["micro_batches"] == 4


@pytest.mark.slow
def test_selective_checkpointing_recomputes_only_the_first_n_layers(legs):
    """model.activation_checkpointing_layers=1: layer 0 runs twice per micro-batch (forward + recompute), every
    later layer once; a count above the model's depth is refused with the key named."""
    sel = legs["sel"]
    micro = sel["micro_batches"]
    assert len(sel["calls_per_layer"]) >= 2
    assert sel["calls_per_layer"] == [2 * micro] + [micro] * (len(sel["calls_per_layer"]) - 1)
    assert "activation_checkpointing_layers=99: the model has only" in legs["too_deep"]["error"]


@pytest.mark.slow
def test_compiled_model_trains_with_the_eager_losses(legs):
    """model.compile=torch (a lever of issue 14, for the GPU): torch.compile through DeepSpeed's
    engine.compile() under ZeRO-3 with selective checkpointing and gradient accumulation. Two steps' losses
    (the second after an optimizer step) equal eager mode's within fp32 reordering, the model is compiled for
    real (inductor graphs were built, none before), and parameter names - what checkpoints and the export
    write - are unchanged."""
    eager, compiled = legs["sel"], legs["compiled"]
    assert not eager["compiled"] and eager["graphs"] == 0
    assert compiled["compiled"] and compiled["graphs"] > 0
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert eager["losses"][1] < eager["losses"][0]  # the step trained: equal losses are not two frozen models
    assert compiled["keys"] == eager["keys"]


@pytest.mark.slow
def test_weight_decay_reaches_every_matrix_under_zero3(legs, tiny_model_dir):
    """zero.Init replaces every parameter with an empty partition of shape (0,) before the optimizer groups are
    made: split by `p.ndim`, no parameter decayed under ZeRO-3. Decided on the real shape, the decay group is
    every matrix of the plain model (the embedding and the linear weights), and no norm weight."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    matrices = sorted(n for n, p in plain.named_parameters() if p.ndim >= 2)
    assert len(matrices) == 1 + 7 * plain.config.num_hidden_layers  # embedding (tied head) + 7 linears a layer
    assert [n.removeprefix("model.") for n in legs["noac"]["decayed"]] == matrices
    assert not any("norm" in n for n in legs["noac"]["decayed"])


@pytest.mark.slow
def test_end_of_run_export_runs_under_the_watchdog(legs):
    """A rank stuck in the export (ZeRO-3's gather is a collective) fails naming the phase, within its limit."""
    stall = legs["export_stall"]
    assert stall["error"] and "in phase 'export' (limit 2 s" in stall["error"], stall
    assert stall["seconds"] < 30, stall


# ---- preflight: GPU memory estimate and checkpoint size -----------------------------------------------

def _mistral_7b_config():
    from transformers import MistralConfig

    from trainer.tiny_model import MISTRAL_7B, parameter_count

    return MistralConfig(**MISTRAL_7B), parameter_count(MISTRAL_7B)


def test_memory_estimate_separates_what_fits_one_h200_from_what_does_not():
    from trainer import config as C
    from trainer.memory import REFUSE_RATIO, estimate_gpu_memory

    mc, n = _mistral_7b_config()
    assert 7.2e9 < n < 7.3e9
    h200 = 139.8
    preset = estimate_gpu_memory(C.load("mistral-7b-zero3-1gpu"), mc, n, 1)
    # the preset ran on an H200 at 117 GiB peak: the estimate must let it run
    assert preset.total_gib < h200
    # without activation checkpointing the same 8 x 2,048-token micro-batch ran out of memory there
    no_ac = estimate_gpu_memory(C.load("mistral-7b-zero3-1gpu", ["model.activation_checkpointing=false"]), mc, n, 1)
    assert no_ac.total_gib > REFUSE_RATIO * h200
    assert no_ac.activations_gib > 10 * preset.activations_gib
    # fp32 master weights + Adam moments: 12 bytes per parameter at world size 1, an eighth of it on 8 GPUs
    assert preset.optimizer_gib * 2**30 == pytest.approx(12 * n)
    eight = estimate_gpu_memory(C.load("mistral-7b-zero3"), mc, n, 8)
    assert eight.optimizer_gib == pytest.approx(preset.optimizer_gib / 8)


def test_memory_estimate_of_selective_checkpointing_lies_between_none_and_full():
    from trainer import config as C
    from trainer.memory import estimate_gpu_memory

    mc, n = _mistral_7b_config()
    acts = {k: estimate_gpu_memory(C.load("mistral-7b-zero3-1gpu", [f"model.activation_checkpointing_layers={k}"]),
                                   mc, n, 1).activations_gib for k in (32, 24, 0)}
    full = estimate_gpu_memory(C.load("mistral-7b-zero3-1gpu"), mc, n, 1).activations_gib
    none = estimate_gpu_memory(C.load("mistral-7b-zero3-1gpu", ["model.activation_checkpointing=false"]),
                               mc, n, 1).activations_gib
    assert acts[32] == pytest.approx(full)
    assert full < acts[24] < acts[0] < none + 3  # 0 checkpointed layers ~ no checkpointing (+ one recompute set)
    # each layer that keeps its activations adds its full set minus the input it would have kept
    assert (acts[24] - full) == pytest.approx((acts[0] - full) * 8 / 32)


def _bare_recipe(tmp_path, tiny_model_dir, *overrides):
    from trainer import config as C
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    cfg = C.load("cpu-tiny", [f"model.path={tiny_model_dir}", f"checkpoint.storage_path={tmp_path}", *overrides])
    recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
    recipe.device = torch.device("cpu")
    return recipe


def test_preflight_refuses_a_config_the_gpu_cannot_hold(tmp_path, tiny_model_dir, monkeypatch):
    from types import SimpleNamespace

    from trainer.memory import ResourcePreflightError

    recipe = _bare_recipe(tmp_path, tiny_model_dir, "data.max_length=4096", "batch.micro_batch_size=64")
    recipe.device = torch.device("cuda", 0)  # a device object only: nothing touches CUDA but the patched call
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=2**28))
    with pytest.raises(ResourcePreflightError, match="activation_checkpointing"):
        recipe._preflight_resources()


def test_preflight_refuses_a_checkpoint_the_volume_cannot_hold(tmp_path, tiny_model_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    from trainer.memory import ResourcePreflightError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    recipe = _bare_recipe(tmp_path, tiny_model_dir)
    with pytest.raises(ResourcePreflightError, match="save_optimizer_state=false") as e:
        recipe._preflight_resources()
    assert str(tmp_path) in str(e.value) and "0.0 GB free" in str(e.value)
    assert f"takes about {recipe.checkpoint_bytes / 1e9:.1f} GB" in str(e.value)
    # weights-only checkpoints of a bf16 model: 2 bytes per parameter; full ZeRO-3 state: 12 (fp32 master
    # weights + two Adam moments; measured 13.69 GB for 1.14B parameters on an H200)
    from trainer.memory import checkpoint_bytes

    assert checkpoint_bytes(1000, False, "bf16") == 2000
    assert checkpoint_bytes(1000, True, "bf16", stage=3) == 12000
    assert checkpoint_bytes(1000, True, "bf16", stage=2) == 14000
    assert checkpoint_bytes(1000, True, "fp32", stage=2) == 16000  # the tiny CPU model's ZeRO-2 checkpoints


WEIGHTS_ONLY = textwrap.dedent(
    """
    import os, sys, json, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[5], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from safetensors.torch import load_file
    from trainer import config as C
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    model_dir, data_dir, out, steps = sys.argv[1:5]
    cfg = C.load("cpu-tiny", [f"model.path={model_dir}", f"data.path={data_dir}", f"checkpoint.storage_path={out}",
                              "scaling.num_workers=1", f"schedule.max_steps={steps}", "deepspeed.stage=3",
                              "checkpoint.save_optimizer_state=false", "checkpoint.every_steps=2",
                              "checkpoint.run_name=wo", "logging.every_steps=1", "logging.eval_every_steps=100"])
    deepspeed.init_distributed(dist_backend="gloo")
    recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
    recipe.setup()
    first = {"step": recipe.progress.global_step, "lr_epoch": recipe.scheduler.last_epoch,
             "optimizer_lr": recipe.scheduler.optimizer.param_groups[0]["lr"],
             "scheduler_lr": recipe.scheduler.get_last_lr()[0]}
    if first["step"]:
        ckpt = recipe.ctx.latest_checkpoint()
        saved = load_file(str(ckpt / "hf" / "model.safetensors"))
        name = "model.layers.0.mlp.down_proj.weight"
        with deepspeed.zero.GatheredParameters(list(recipe.engine.module.parameters())):
            live = dict(recipe.engine.module.model.named_parameters())[name].detach().clone()
        first["weights_equal"] = bool(torch.equal(saved[name], live))
    recipe.train()
    print("RESULT " + json.dumps(first))
    """
)


@pytest.mark.slow
def test_weights_only_checkpoint_resumes_weights_schedule_and_position(tmp_path, tiny_model_dir, synthetic_data_dir):
    import json

    def go(steps, port):
        proc = subprocess.run([sys.executable, "-c", WEIGHTS_ONLY, str(tiny_model_dir), str(synthetic_data_dir),
                               str(tmp_path), str(steps), str(port)], capture_output=True, text=True, timeout=600)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(line[-1].removeprefix("RESULT ")), proc.stdout

    first, _ = go(4, 29543)
    run = tmp_path / "wo"
    ckpt = run / "checkpoint_00000004"
    assert not (ckpt / "deepspeed").exists()  # no optimizer state on the volume
    assert (ckpt / "hf" / "model.safetensors").is_file() and (ckpt / "scheduler.pt").is_file()
    assert first == {"step": 0, "lr_epoch": 0, "optimizer_lr": pytest.approx(1e-4),  # warm-up step 1 of 20
                     "scheduler_lr": pytest.approx(1e-4)}
    second, out = go(6, 29544)
    # the fresh optimizer runs step 5 at the schedule's step-5 LR (5 of 20 warm-up steps x 2e-3), not at its
    # step-1 value: LambdaLR.load_state_dict alone leaves the optimizer's lr untouched
    assert second == {"step": 4, "lr_epoch": 4, "weights_equal": True, "optimizer_lr": pytest.approx(5e-4),
                      "scheduler_lr": pytest.approx(5e-4)}, second
    assert "Adam's moments restart" in out
    train = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in train if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    lr = {m["step"]: m["lr"] for m in train if m["kind"] == "train"}  # the LR each step used
    assert [lr[s] for s in steps] == pytest.approx([s * 2e-3 / 20 for s in steps])
    # the final checkpoint is on the volume before the end-of-run validation starts
    assert [m["kind"] for m in train if m["kind"] in ("checkpoint", "eval")][-2:] == ["checkpoint", "eval"]
    # the resumed steps continue the loss curve (no jump back to the untrained loss of step 1)
    loss = {m["step"]: m["loss"] for m in train if m["kind"] == "train"}
    assert loss[5] < loss[1] and loss[6] < loss[1]


ROPE_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29545", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from trainer.model import restore_fp32_rope

    deepspeed.init_distributed(dist_backend="gloo")
    plain = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).model.rotary_emb.inv_freq
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    keep = HfDeepSpeedConfig(ds)  # from_pretrained now builds the model under deepspeed.zero.Init
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    before = model.model.rotary_emb.inv_freq.clone()
    n = restore_fp32_rope(model)
    after = model.model.rotary_emb
    print("ROPE", before.dtype, plain.dtype, after.inv_freq.dtype, n,
          float((before.float() - plain).abs().max()), float((after.inv_freq - plain).abs().max()),
          float((after.original_inv_freq - plain).abs().max()), restore_fp32_rope(model))
    """
)


@pytest.mark.slow
def test_rotary_frequencies_stay_fp32_under_zero3_init(tiny_model_dir):
    """zero.Init casts the rotary inv_freq buffer to bf16 (positions drift from what the export and vLLM use);
    the recipe recomputes it in fp32, equal to a plain load's."""
    proc = subprocess.run([sys.executable, "-c", ROPE_SCRIPT, str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROPE ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    before, plain, after, n, err_before, err_after, err_orig, again = line[-1].split()[1:]
    assert (before, plain, after) == ("torch.bfloat16", "torch.float32", "torch.float32")
    assert float(err_before) > 1e-4  # the bug: bf16 frequencies
    assert int(n) == 1 and float(err_after) == 0.0 and float(err_orig) == 0.0
    assert int(again) == 0  # nothing left to fix
