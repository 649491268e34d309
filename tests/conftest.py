"""Shared fixtures. Session-scoped artifacts are built once, for real (no stand-ins):
the tiny Mistral model with the real v3 tokenizer, and a prepared synthetic Dolly data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is missing (a user's clone without ../shared): CRD-schema checks need it")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trainer.tiny_model import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """600 synthetic records -> prepare (max length 512), 48 validation, 48 test."""
    from trainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(source="synthetic", out=out, tokenizer=tiny_model_dir, max_length=512,
            num_examples=600, seed=0, val_size=48, test_size=48)
    return out
