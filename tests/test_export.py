"""The exported Hugging Face folder computes the same logits as the model the DeepSpeed engine trained.

Runs the recipe without Ray (world size 1, the path the GPU benchmark uses) in a subprocess, so the
process group it creates does not leak into other tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from transformers import AutoModelForCausalLM
    from trainer import config as C
    from trainer.contexts import LocalContext
    from trainer.recipe import FullFinetuneRecipe

    model_dir, data_dir, out, stage = sys.argv[1:5]
    cfg = C.load("cpu-tiny", [f"model.path={model_dir}", f"data.path={data_dir}", f"checkpoint.storage_path={out}",
                              "scaling.num_workers=1", "schedule.max_steps=4", f"deepspeed.stage={stage}",
                              "checkpoint.every_steps=100", "logging.every_steps=2", "logging.eval_every_steps=100"])
    from trainer import ds_ops
    ds_ops.prepare(cfg)  # as the recipe does, before deepspeed.comm starts
    deepspeed.init_distributed(dist_backend="gloo")
    recipe = FullFinetuneRecipe(cfg, LocalContext(cfg.run_dir()))
    recipe.setup()
    recipe.train()
    ids = torch.tensor([[1, 3, 2592, 1117, 1040, 6333, 1070, 5611, 4, 1183, 1032]])
    recipe.engine.eval()
    with torch.no_grad():
        if stage == "3":
            with deepspeed.zero.GatheredParameters(list(recipe.engine.module.parameters())):
                trained = recipe.engine.module.model(ids).logits.clone()
        else:
            trained = recipe.engine.module.model(ids).logits.clone()
    exported_dir = recipe.export(f"{out}/export")
    exported = AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got, before = exported(ids).logits, base(ids).logits
    torch.testing.assert_close(got, trained, rtol=1e-5, atol=1e-5)
    assert (before - trained).abs().max() > 1e-2, "training did not change the model"
    print("EXPORT-OK", float((got - trained).abs().max()))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["2", "3"])
def test_export_logits_equal_trained_model(tmp_path, tiny_model_dir, synthetic_data_dir, stage):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(synthetic_data_dir),
                           str(tmp_path), stage], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "EXPORT-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
