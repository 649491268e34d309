"""The host-memory preflight (trainer/memory.py) for optimizer/parameter offload: the estimate against what
DeepSpeed really allocates (counted on its optimizer after a step, on the CPU), the limit it reads (cgroup v2/v1,
MemAvailable, an explicit override), and the refusal of the 7B ZeRO-2 offload run that the H100's 125 GiB host
killed (issue 28)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import yaml

from trainer import config as C
from trainer.memory import (GIB, HOST_KNOBS, ResourcePreflightError, check_host_memory, estimate_host_memory,
                            host_memory_limit, pinned)


def _mistral_7b_shapes() -> list[tuple]:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from trainer.tiny_model import MISTRAL_7B

    with torch.device("meta"):
        return [tuple(p.shape) for p in AutoModelForCausalLM.from_config(MistralConfig(**MISTRAL_7B)).parameters()]


@pytest.fixture(scope="module")
def shapes_7b():
    return _mistral_7b_shapes()


@pytest.fixture
def no_limit_env(monkeypatch, tmp_path):
    """A host with no cgroup limit and a known MemAvailable, read from files the test writes."""
    monkeypatch.delenv("DOLLY_HOST_MEMORY_GIB", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cg = tmp_path / "cgroup"
    cg.mkdir()
    (cg / "memory.max").write_text("max\n")
    monkeypatch.setenv("DOLLY_CGROUP_ROOT", str(cg))
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:        120000000 kB\nMemAvailable:   125829120 kB\n")
    monkeypatch.setenv("DOLLY_MEMINFO", str(meminfo))
    return cg


def test_pinned_blocks_round_up_to_powers_of_two():
    assert [pinned(x) for x in (0, 1, 3, 4, 5, 4096, 4097)] == [0, 1, 4, 4, 8, 4096, 8192]
    assert pinned(4 * 7.25e9) == 32 * GIB  # the 7B's fp32 partition at world size 1: 29 GB pins 32 GiB


def test_the_limit_comes_from_the_cgroup_then_meminfo(no_limit_env, tmp_path, monkeypatch):
    assert host_memory_limit() == (125829120 * 1024, "MemAvailable")  # v2 "max": no limit set
    (no_limit_env / "memory.max").write_text(f"{96 * GIB}\n")
    assert host_memory_limit() == (96 * GIB, f"cgroup {no_limit_env / 'memory.max'}")
    (no_limit_env / "memory.max").unlink()
    (no_limit_env / "memory").mkdir()
    (no_limit_env / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 unlimited
    assert host_memory_limit()[1] == "MemAvailable"
    (no_limit_env / "memory" / "memory.limit_in_bytes").write_text(f"{64 * GIB}\n")
    assert host_memory_limit() == (64 * GIB, f"cgroup {no_limit_env / 'memory' / 'memory.limit_in_bytes'}")
    monkeypatch.setenv("DOLLY_HOST_MEMORY_GIB", "200")
    assert host_memory_limit() == (200 * GIB, "DOLLY_HOST_MEMORY_GIB")


def test_zero2_offload_of_the_7b_is_refused_on_a_125_gib_host_naming_the_knobs(no_limit_env, shapes_7b):
    cfg = C.load("mistral-7b-zero3", ["deepspeed.stage=2", "deepspeed.offload_optimizer=true",
                                      "batch.gradient_accumulation_steps=8", "scaling.num_workers=1"])
    with pytest.raises(ResourcePreflightError) as e:
        check_host_memory(cfg, shapes_7b, 1)
    msg = str(e.value)
    assert "host memory estimate 153.0 GiB of 120 GiB (MemAvailable)" in msg, msg
    assert HOST_KNOBS in msg and "deepspeed.offload_optimizer=false" in msg
    # the same config on a host that holds it passes, and the estimate says what it counted
    (no_limit_env / "memory.max").write_text(f"{256 * GIB}\n")
    est = check_host_memory(cfg, shapes_7b, 1)
    assert est.limit_gib == 256 and est.total_gib == pytest.approx(153.0, abs=0.05)


def test_no_offload_no_host_check(no_limit_env, shapes_7b):
    (no_limit_env / "memory.max").write_text("1\n")  # a 1-byte limit would refuse anything that is checked
    assert check_host_memory(C.load("mistral-7b-zero3-1gpu"), shapes_7b, 1) is None


def test_the_offload_preset_counts_its_node_and_fits_the_charts_request(no_limit_env, shapes_7b, monkeypatch, repo):
    values = yaml.safe_load((repo / "charts" / "dolly-train" / "values-gpu-offload.yaml").read_text())
    w = values["worker"]
    ranks = w["gpusPerPod"]
    workers = values["train"]["scaling"]["num_workers"]
    assert workers == w["replicas"] * ranks
    cfg = C.load("mistral-7b-zero3-offload")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    request = w["resources"]["requests"]["memory"]
    assert request.endswith("Gi")
    (no_limit_env / "memory.max").write_text(f"{int(request[:-2]) * GIB}\n")  # the pod's limit = the request
    est = check_host_memory(cfg, shapes_7b, workers)
    assert est.ranks_on_node == ranks
    # 7.25B fp32 master weights and fp32 gradients in 1e9-element sub-groups, one bf16 flat gradient buffer per
    # rank, 8 B/param of moments
    per_rank = 7_248_023_552 / 4
    master = pinned(4e9) + pinned(4 * (per_rank - 1e9))
    assert est.master_gib * GIB == ranks * master
    assert est.gradients_gib * GIB == ranks * (master + pinned(2 * per_rank))
    assert est.moments_gib * GIB == pytest.approx(8 * 7_248_023_552)
    # the chart asks for the estimate plus headroom, and its limit is the request
    assert est.total_gib < int(request[:-2]) <= 1.3 * est.total_gib
    assert w["resources"]["limits"]["memory"] == request


# DeepSpeed itself, on the CPU: after one step of ZeRO-2 and of ZeRO-3 with optimizer offload, the bytes of every
# host-side state its optimizer holds, found by walking the optimizer's attributes (no pinning on a CPU).
COUNT = textwrap.dedent(
    """
    import os, sys, json, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from trainer import config as C
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    def tensors(obj, depth=0, seen=None):
        seen = set() if seen is None else seen
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
            if obj.grad is not None:
                yield obj.grad
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v, depth + 1, seen)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v, depth + 1, seen)

    from trainer import ds_ops

    model_dir, data_dir, out = sys.argv[1:4]
    result = {}
    for stage in (2, 3):
        cfg = C.load("cpu-tiny", [f"model.path={model_dir}", f"data.path={data_dir}",
                                  f"checkpoint.storage_path={out}/{stage}", "scaling.num_workers=1",
                                  "schedule.max_steps=1", f"deepspeed.stage={stage}",
                                  "deepspeed.offload_optimizer=true", "batch.gradient_accumulation_steps=2",
                                  "checkpoint.run_name=host-memory",
                                  "watchdog.setup_s=3600"])  # the first run JIT-builds cpu_adam (minutes here)
        if stage == 2:
            ds_ops.prepare(cfg)  # as the recipe does, but before the process group: no shm op build
            deepspeed.init_distributed(dist_backend="gloo")
        recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
        recipe.setup()
        plan = recipe._plan(0)
        micro, labels, _ = recipe.step_batches(plan, 0)
        recipe.train_step(micro, labels)
        opt = recipe.engine.optimizer
        # the model's own storage (ZeRO-2's flat bf16 groups, ZeRO-3's partitions): device memory on a GPU
        device = {t.untyped_storage().data_ptr() for t in tensors(
            [list(recipe.engine.module.parameters()), getattr(opt, "bit16_groups_flat", []),
             getattr(opt, "fp16_partitioned_groups_flat", []), [getattr(p, "ds_tensor", None) for p in
             recipe.engine.module.parameters()]])}
        named = {}
        for name in ("single_partition_of_fp32_groups", "param_buffer_of_bit16_for_cpu_offload_groups",
                     "accumulated_grads_in_cpu", "fp32_partitioned_groups_flat", "grad_partitions_flat_buffer"):
            if hasattr(opt, name):
                named[name] = getattr(opt, name)
        named["optimizer.state"] = {id(k): v for k, v in opt.optimizer.state.items()}
        counted, by = set(), {}
        for name, obj in named.items():
            for t in tensors(obj):
                ptr = t.untyped_storage().data_ptr()
                if t.device.type == "cpu" and ptr not in device and ptr not in counted and t.numel() > 1:
                    counted.add(ptr)
                    by[name] = by.get(name, 0) + t.untyped_storage().nbytes()
        shapes = [tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for p in recipe.engine.module.parameters()]
        result[stage] = {"by": by, "shapes": shapes}
        recipe.engine.destroy()
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
def test_the_estimate_matches_what_deepspeed_allocates(tmp_path, tiny_model_dir, synthetic_data_dir):
    proc = subprocess.run([sys.executable, "-c", COUNT, str(tiny_model_dir), str(synthetic_data_dir), str(tmp_path),
                           "29561"], capture_output=True, text=True, timeout=1200)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(line[7:])
    for stage in (2, 3):
        r = result[str(stage)]
        shapes = [tuple(s) for s in r["shapes"]]
        cfg = C.load("cpu-tiny", [f"deepspeed.stage={stage}", "deepspeed.offload_optimizer=true",
                                  "batch.gradient_accumulation_steps=2"])
        est = estimate_host_memory(cfg, shapes, 1, 1, pin=False)
        counted = sum(r["by"].values())
        estimated = (est.total_gib - est.baseline_gib) * GIB
        n = sum(math.prod(s) for s in shapes)
        assert r["by"]["optimizer.state"] == pytest.approx(8 * n, rel=0.01), r["by"]  # Adam's two fp32 moments
        # DeepSpeed pads partitions for alignment: within 2%
        assert counted == pytest.approx(estimated, rel=0.02), (stage, r["by"], est)


def test_lora_offload_counts_the_adapter_not_the_frozen_base(no_limit_env, shapes_7b):
    """LoRA (issue 25) with optimizer offload: DeepSpeed's offloaded optimizer holds only the trainable
    parameters, so the 7B run the full fine-tune's 153 GiB estimate refuses on a 125 GiB host fits. The adapter
    size is worked out by hand for Mistral-7B (H 4096, I 14336, 8 KV heads of 128, 32 layers): r x (in + out)
    over q, k, v, o, gate, up, down = r x 81,920 a layer, 41,943,040 at r = 16 (peft's printed count)."""
    from transformers import MistralConfig

    from trainer.lora import adapter_shapes
    from trainer.tiny_model import MISTRAL_7B

    cfg = C.load("mistral-7b-lora-1gpu", ["deepspeed.offload_optimizer=true", "batch.gradient_accumulation_steps=8"])
    assert cfg.lora.r == 16
    trained = adapter_shapes(cfg, MistralConfig(**MISTRAL_7B))
    n = sum(math.prod(s) for s in trained)
    assert n == 41_943_040
    est = check_host_memory(cfg, shapes_7b, 1, trained)  # the 125 GiB host of the refusal above: passes
    assert est.moments_gib * GIB == pytest.approx(8 * n)
    # ZeRO-2, all adapter tensors are matrices (one decayed group): fp32 master + fp32 gradients + a bf16 update
    # buffer, and with accumulation a bf16 buffer per parameter
    assert est.master_gib * GIB == pinned(4 * n)
    assert est.gradients_gib * GIB == pinned(4 * n) + sum(pinned(2 * math.prod(s)) for s in trained)
    assert est.params_gib * GIB == pinned(2 * n)
    assert est.total_gib - est.baseline_gib < 1.1  # about 1 GiB offloaded, against 149 GiB for the full fine-tune
    # Without the adapter shapes the same config counts the whole 7B and is refused: the difference is the LoRA term.
    with pytest.raises(ResourcePreflightError):
        check_host_memory(cfg, shapes_7b, 1)
