"""The training-config schema: presets load, bad keys/values name the key, DeepSpeed files never drift,
and the CLI refuses bad runs before any worker starts."""

from __future__ import annotations

import json

import pytest

from trainer import config as C
from trainer.cli import main


def test_presets_load_and_deepspeed_files_match_the_schema():
    for name in C.PRESETS:
        cfg = C.load(name)
        committed = (C.DEEPSPEED_DIR / f"{name}.json").read_text()
        assert committed == C.render_deepspeed_json(cfg), f"{name}.json drifted: run `dolly-train render-deepspeed`"
        ds = json.loads(committed)
        assert ds["zero_optimization"]["stage"] == cfg.deepspeed.stage
        assert ds["train_micro_batch_size_per_gpu"] == cfg.batch.micro_batch_size
    z3 = json.loads((C.DEEPSPEED_DIR / "mistral-7b-zero3.json").read_text())
    assert z3["bf16"]["enabled"] and z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    off = json.loads((C.DEEPSPEED_DIR / "mistral-7b-zero3-offload.json").read_text())
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_every_preset_opens_with_the_command_that_runs_it():
    for name in C.PRESETS:
        head = (C.PRESET_DIR / f"{name}.yaml").read_text().splitlines()[:4]
        assert any(f"dolly-train train --config {name}" in line for line in head), name


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key optim.lrr"),
        ("bogus=1", "unknown key bogus"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("deepspeed.stage=1", "deepspeed.stage: 1 is not one of [2, 3]"),
        ("batch.micro_batch_size=0", "batch.micro_batch_size: 0 is below the minimum 1"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu: expected true/false"),
        ("schedule.decay=step", "schedule.decay: 'step' is not one of"),
        ("deepspeed.offload_params=true", "parameter offload needs deepspeed.stage 3"),
        ("model.precision=bf16", "bf16 is for GPU workers"),
        ("checkpoint.storage_path=ftp://x/y", "neither a filesystem path nor an s3://"),
        ("checkpoint.run_name=a/b", "checkpoint.run_name"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("model=3", "model: expected a mapping"),
        ("model.compile=fast", "model.compile: 'fast' is not one of"),
        ("model.compile=deepcompile", "deepcompile needs GPU workers"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        C.load("cpu-tiny", [override])


def test_deepcompile_is_asked_of_deepspeed_in_its_config():
    """`model.compile=deepcompile` is DeepSpeed's own switch ("compile": {"deepcompile": true}, read by
    engine.compile()); 'torch' and 'none' add nothing, so the shipped DeepSpeed files stay as they are."""
    gpu = ["model.path=m", "data.path=d"]
    assert C.deepspeed_config(C.load("mistral-7b-zero3-1gpu", [*gpu, "model.compile=deepcompile"]))["compile"] == {
        "deepcompile": True}
    for choice in ("none", "torch"):
        assert "compile" not in C.deepspeed_config(C.load("mistral-7b-zero3-1gpu", [*gpu, f"model.compile={choice}"]))


def test_overrides_and_yaml_types():
    cfg = C.load("cpu-tiny", ["optim.lr=3e-4", "schedule.max_steps=7", "scaling.num_workers=1", "checkpoint.storage_path=s3://b/p"])
    assert cfg.optim.lr == 3e-4 and cfg.schedule.max_steps == 7 and cfg.scaling.num_workers == 1
    assert cfg.is_remote_storage and cfg.run_dir() == "s3://b/p/tiny-demo"
    assert C.from_dict(cfg.to_dict()) == cfg  # round trip


def _train(*args) -> int:
    return main(["train", "--config", "cpu-tiny", *args])


def test_train_refuses_bad_runs_before_starting_workers(tmp_path, capsys, tiny_model_dir, synthetic_data_dir):
    ok = [f"model.path={tiny_model_dir}", f"data.path={synthetic_data_dir}", f"checkpoint.storage_path={tmp_path}"]
    assert _train(*ok[1:], f"model.path={tmp_path}/missing-model") == 2
    assert "model.path" in capsys.readouterr().err
    assert _train(ok[0], ok[2], f"data.path={tmp_path}/nodata") == 2
    assert "tokenized/train is missing" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("not a dir")
    assert _train(*ok[:2], f"checkpoint.storage_path={blocked}") == 2
    assert "cannot write" in capsys.readouterr().err
    assert _train(*ok, "data.max_length=64") == 2
    assert "below the length the data was prepared for" in capsys.readouterr().err
    assert _train(*ok, "optim.lr=-1") == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_train_refuses_gpu_config_without_gpus(tmp_path, capsys, tiny_model_dir, synthetic_data_dir, ray_cluster,
                                               monkeypatch):
    # bf16 + GPUs is a valid config; this machine's Ray cluster has no GPUs, so it must stop before workers start
    for key, value in ray_cluster.items():  # the session's cluster (conftest.py), as the other train runs
        monkeypatch.setenv(key, value)
    rc = _train(f"model.path={tiny_model_dir}", f"data.path={synthetic_data_dir}", f"checkpoint.storage_path={tmp_path}",
                "scaling.use_gpu=true", "model.precision=bf16")
    assert rc == 2
    assert "Ray cluster has 0 GPUs" in capsys.readouterr().err
    import ray

    ray.shutdown()


def test_help_config_lists_every_key(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key, _, _ in C.describe():
        assert key in out


def test_render_deepspeed_check(tmp_path):
    out = tmp_path / "ds.json"
    assert main(["render-deepspeed", "--config", "cpu-tiny", "--out", str(out)]) == 0
    assert main(["render-deepspeed", "--config", "cpu-tiny", "--out", str(out), "--check"]) == 0
    out.write_text("{}")
    assert main(["render-deepspeed", "--config", "cpu-tiny", "--out", str(out), "--check"]) == 1
