"""`dolly-train data-stats`: JSON + PNG with numbers that agree with the data they describe."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from trainer.cli import main
from trainer.data.prepare import prepare
from trainer.data.stats import data_stats, length_stats
from trainer.tiny_model import write_tokenizer


@pytest.fixture(scope="module")
def dolly_dir(tmp_path_factory) -> Path:
    """Dolly-length synthetic data (long tail included) prepared at 1,024 tokens."""
    root = tmp_path_factory.mktemp("stats")
    write_tokenizer(root)
    prepare(source="synthetic", out=root / "data", tokenizer=root, max_length=1024, num_examples=800, seed=0,
            val_size=40, test_size=60, profile="dolly")
    return root / "data"


def test_length_stats_percentiles():
    s = length_stats(list(range(1, 101)))
    assert s == {"count": 100, "mean": 50.5, "p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert length_stats([])["count"] == 0


def test_stats_json_and_png(dolly_dir, tmp_path):
    import datasets

    stats = data_stats(dolly_dir, out=tmp_path / "report")
    on_disk = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert on_disk == stats
    manifest = json.loads((dolly_dir / "manifest.json").read_text())
    assert stats["max_length"] == 1024 and set(stats["splits"]) == {"train", "validation", "test"}
    for split, s in stats["splits"].items():
        assert s["all"]["count"] == manifest["counts"][split]["total"]
        assert {c: v["count"] for c, v in s["by_category"].items()} == manifest["counts"][split]["by_category"]
        for v in [s["all"], *s["by_category"].values()]:
            assert 0 < v["p50"] <= v["p90"] <= v["p99"] <= v["max"] <= 1024
    # recomputed from the tokenized split itself
    train = datasets.load_from_disk(str(dolly_dir / "tokenized" / "train"))
    by_cat = defaultdict(list)
    for c, ids in zip(train["category"], train["input_ids"]):
        by_cat[c].append(len(ids))
    for c, ns in by_cat.items():
        got = stats["splits"]["train"]["by_category"][c]
        assert got["max"] == max(ns) and got["mean"] == round(float(np.mean(ns)), 1)
    all_train = [n for ns in by_cat.values() for n in ns]
    p = stats["packing"]["train"]
    assert p["real_tokens"] == sum(all_train) and p["examples"] == len(all_train)
    assert p["packed"]["row_tokens"] == p["packed"]["rows"] * 1024 >= p["real_tokens"]
    assert p["packed"]["rows"] >= -(-p["real_tokens"] // 1024)
    assert 0.9 < p["packed"]["efficiency"] <= 1 and 0 < p["padded"]["efficiency"] < p["packed"]["efficiency"]
    png = (tmp_path / "report" / "lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "report" / "lengths.png").shape[:2] == (450, 1300)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["lengths.png", "stats.json"]


def test_cli_defaults_and_shorter_rows(dolly_dir, capsys):
    assert main(["data-stats", "--data", str(dolly_dir), "--max-length", "512"]) == 0
    out = capsys.readouterr().out
    assert "packing efficiency" in out and "train:" in out
    stats = json.loads((dolly_dir / "stats" / "stats.json").read_text())
    p = stats["packing"]["train"]
    assert stats["max_length"] == 512 and p["longer_than_max_length"] > 0
    assert p["examples"] + p["longer_than_max_length"] == stats["splits"]["train"]["all"]["count"]


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["data-stats", "--data", str(tmp_path)]) == 2
    assert f"{tmp_path / 'manifest.json'}: missing" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data_dir: x\n")
    assert main(["data-stats", "--config", str(cfg)]) == 2
    assert "unknown option 'data_dir'" in capsys.readouterr().err
