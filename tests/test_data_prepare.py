"""`dolly-train prepare`: validation errors, skip counting, over-long drops, dedup, the split, the output
contract (docs/CONTRACTS.md) and the CLI. Real tokenizer, real `datasets`, no network."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from trainer.cli import main
from trainer.data.prepare import prepare
from trainer.data.records import DataError, record_id
from trainer.data.synthetic import generate
from trainer.prompt import IGNORE_INDEX, PromptEncoder
from trainer.tiny_model import write_tokenizer

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    """Just the tokenizer files: prepare needs no model weights."""
    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(d)
    return d


def write_lines(path: Path, lines: list) -> Path:
    """lines: dicts (written as JSON) or raw bytes/str (written verbatim)."""
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


GOOD = generate(40, seed=123)
BAD = {
    "malformed_json": ('{"instruction": "x", "context": ', "malformed JSON"),
    "bad_utf8": (b'{"instruction": "\xff\xfe", "context": "", "response": "r", "category": "open_qa"}',
                 "malformed JSON"),
    "not_an_object": ("[1, 2, 3]", "expected a JSON object"),
    "missing_response": ({"instruction": "q", "context": "", "category": "open_qa"}, "field 'response' is missing"),
    "null_context": ({"instruction": "q", "context": None, "response": "r", "category": "open_qa"},
                     "field 'context' is missing"),
    "non_string_response": ({"instruction": "q", "context": "", "response": 5, "category": "open_qa"},
                            "field 'response' must be a string, got int 5"),
    "non_string_category": ({"instruction": "q", "context": "", "response": "r", "category": ["open_qa"]},
                            "field 'category' must be a string"),
    "empty_instruction": ({"instruction": "  \n", "context": "", "response": "r", "category": "open_qa"},
                          "field 'instruction' is empty"),
    "empty_response": ({"instruction": "q", "context": "c", "response": "", "category": "closed_qa"},
                       "field 'response' is empty"),
    "unknown_category": ({"instruction": "q", "context": "", "response": "r", "category": "poetry"},
                         "field 'category': unknown category 'poetry'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_record_names_file_line_and_field(tmp_path, tok, case, capsys):
    bad, message = BAD[case]
    src = write_lines(tmp_path / "dolly.jsonl", GOOD[:2] + [bad] + GOOD[2:10])
    with pytest.raises(DataError) as e:
        prepare(source="jsonl", path=src, out=tmp_path / "out", tokenizer=tok, max_length=512)
    assert str(e.value).startswith(f"{src}:3: ")
    assert message in str(e.value)
    # the CLI prints the same message and exits 2, writing nothing
    rc = main(["prepare", "--source", "jsonl", "--path", str(src), "--tokenizer", str(tok),
               "--max-length", "512", "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{src}:3: " in err and message in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dolly.jsonl"]  # no temp dirs left behind


def test_skip_invalid_counts_each_reason(tmp_path, tok, capsys):
    lines = list(GOOD[:30])
    for bad, _ in BAD.values():
        lines.insert(random.Random(len(lines)).randrange(len(lines)), bad)
    lines += [dict(GOOD[0]), {**GOOD[1], "response": "  " + GOOD[1]["response"] + "\n"}]  # 2 duplicates
    src = write_lines(tmp_path / "dolly.jsonl", lines)
    rc = main(["prepare", "--source", "jsonl", "--path", str(src), "--tokenizer", str(tok), "--max-length", "512",
               "--out", str(tmp_path / "out"), "--skip-invalid", "--val-size", "3", "--test-size", "3"])
    assert rc == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == {
        "malformed_json": 2, "not_an_object": 1, "missing_response": 1, "missing_context": 1,
        "non_string_response": 1, "non_string_category": 1, "empty_instruction": 1, "empty_response": 1,
        "unknown_category": 1, "duplicate": 2,
    }
    assert sum(manifest["counts"][s]["total"] for s in SPLITS) == 30
    out = capsys.readouterr().out
    assert "duplicate 2" in out and "malformed_json 2" in out and "train 24" in out


def test_duplicates_share_an_id_and_are_dropped(tmp_path, tok):
    twin = {**GOOD[5], "instruction": GOOD[5]["instruction"] + "  "}  # same content once stripped
    assert record_id(twin) == record_id(GOOD[5])
    src = write_lines(tmp_path / "d.jsonl", GOOD[:20] + [GOOD[3], twin])
    m = prepare(source="jsonl", path=src, out=tmp_path / "out", tokenizer=tok, max_length=512,
                val_size=2, test_size=2)
    assert m["skipped"] == {"duplicate": 2}
    ids = [r["id"] for s in SPLITS for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")]
    assert len(ids) == len(set(ids)) == 20
    # the first occurrence is kept, with its source line
    kept = {r["id"]: r for s in SPLITS for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")}
    assert kept[record_id(GOOD[5])]["source_index"] == 6


def test_over_long_examples_are_dropped_from_training_and_counted(tmp_path, tok):
    """The cap applies to train/validation after the split: over-long examples there are dropped and counted
    per split; the test split keeps its over-long records (counted), whatever the cap."""
    records = generate(200, seed=4, profile="dolly")
    lengths = [len(e.input_ids) for e in PromptEncoder(tok).encode_examples(records)]
    # a limit that some record meets exactly and another just exceeds: the boundary is "longer than", in tokens
    ordered = sorted(set(lengths))
    max_length = next(a for a, b in zip(ordered, ordered[1:]) if a > 120 and b - a <= 2)
    too_long = {record_id(r) for r, n in zip(records, lengths) if n > max_length}
    assert 20 < len(too_long) < 180
    src = write_lines(tmp_path / "d.jsonl", records)
    m = prepare(source="jsonl", path=src, out=tmp_path / "out", tokenizer=tok, max_length=max_length)
    train_val = [r for s in ("train", "validation") for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")]
    test = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert not too_long & {r["id"] for r in train_val}
    test_over = too_long & {r["id"] for r in test}
    assert m["dropped_too_long"] == len(too_long) - len(test_over) == sum(m["dropped_too_long_by_split"].values())
    assert m["test_longer_than_max_length"] == len(test_over)
    assert len(train_val) + len(test) == 200 - m["dropped_too_long"]
    assert m["counts"]["test"]["total"] == len(test) == 20  # the default 10%, independent of the cap
    import datasets

    train = datasets.load_from_disk(str(tmp_path / "out" / "tokenized" / "train"))
    assert max(len(x) for x in train["input_ids"]) <= max_length
    exact = {record_id(r) for r, n in zip(records, lengths) if n == max_length}
    assert exact and exact <= {r["id"] for r in train_val + test}


def test_test_split_does_not_depend_on_the_length_cap(tmp_path, tok):
    """Same records and seed, caps of 96 and 4096 tokens: byte-identical test.jsonl, with its over-long share
    kept (before the fix, a cap dropped the long records before the split and shifted the test set short)."""
    records = generate(300, seed=5, profile="dolly")
    src = write_lines(tmp_path / "d.jsonl", records)
    short = prepare(source="jsonl", path=src, out=tmp_path / "short", tokenizer=tok, max_length=96)
    long = prepare(source="jsonl", path=src, out=tmp_path / "long", tokenizer=tok, max_length=4096)
    assert (tmp_path / "short" / "test.jsonl").read_bytes() == (tmp_path / "long" / "test.jsonl").read_bytes()
    assert short["splits"]["test"]["sha256"] == long["splits"]["test"]["sha256"]
    assert short["test_longer_than_max_length"] > 0 and long["test_longer_than_max_length"] == 0
    assert short["dropped_too_long_by_split"]["train"] > 0 and long["dropped_too_long"] == 0


def test_split_is_deterministic_and_independent_of_input_order(tmp_path, tok):
    records = generate(300, seed=9)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    a = prepare(source="jsonl", path=write_lines(tmp_path / "a.jsonl", records), out=tmp_path / "a",
                tokenizer=tok, max_length=512, seed=3)
    b = prepare(source="jsonl", path=write_lines(tmp_path / "b.jsonl", records), out=tmp_path / "b",
                tokenizer=tok, max_length=512, seed=3)
    c = prepare(source="jsonl", path=write_lines(tmp_path / "c.jsonl", shuffled), out=tmp_path / "c",
                tokenizer=tok, max_length=512, seed=3)
    d = prepare(source="jsonl", path=write_lines(tmp_path / "d.jsonl", records), out=tmp_path / "d",
                tokenizer=tok, max_length=512, seed=4)
    assert a["splits"] == b["splits"]  # same bytes
    for s in SPLITS:
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
        ids = lambda run: [r["id"] for r in read_jsonl(tmp_path / run / f"{s}.jsonl")]  # noqa: E731
        assert ids("a") == ids("c")  # membership and order do not depend on the input order
    assert set(r["id"] for r in read_jsonl(tmp_path / "a" / "test.jsonl")) != \
        set(r["id"] for r in read_jsonl(tmp_path / "d" / "test.jsonl"))
    # defaults: 5% validation, 10% test
    assert (a["counts"]["validation"]["total"], a["counts"]["test"]["total"]) == (15, 30)
    assert (c["counts"], d["counts"]["train"]["total"]) == (a["counts"], 255)


def test_split_is_stratified_by_category(tmp_path, tok):
    m = prepare(source="synthetic", out=tmp_path / "out", tokenizer=tok, max_length=512, num_examples=1000,
                seed=1, val_size=100, test_size=150)
    totals = Counter()
    for s in SPLITS:
        totals.update(m["counts"][s]["by_category"])
    assert sum(totals.values()) == 1000
    for s, size in (("validation", 100), ("test", 150)):
        by_cat = m["counts"][s]["by_category"]
        assert sum(by_cat.values()) == size and set(by_cat) == set(totals)
        for c, n in totals.items():
            assert abs(by_cat[c] - size * n / 1000) < 1, (s, c, by_cat[c], size * n / 1000)


def test_near_duplicates_never_straddle_the_split(tmp_path, tok):
    """One instruction (+ context) written twice with other responses, other case and other whitespace is two
    records after exact de-duplication; both must sit in the same split, or the test set scores a prompt the model
    trained on. Before the fix the split was per record and 60 such pairs straddled train/test."""
    base = [r for r in generate(400, seed=21) if r["instruction"].strip()]
    keys = lambda r: (re.sub(r"\s+", " ", r["instruction"]).strip().lower(),  # noqa: E731 (the test's own oracle)
                      re.sub(r"\s+", " ", r["context"]).strip().lower())
    seen, uniq = set(), []
    for r in base:  # the generator repeats some prompts itself: pair only prompts that occur once
        uniq.append(r) if keys(r) not in seen else None
        seen.add(keys(r))
    counts = Counter(keys(r) for r in base)
    singles = [r for r in uniq if counts[keys(r)] == 1][:60]
    twins = [{**r, "instruction": "  " + r["instruction"].upper().replace(" ", "\n\t "),
              "response": r["response"] + " (a second writer's answer)"} for r in singles]
    m = prepare(source="jsonl", path=write_lines(tmp_path / "d.jsonl", base + twins), out=tmp_path / "out",
                tokenizer=tok, max_length=512, seed=0)
    where: dict = {}
    for s in SPLITS:
        for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl"):
            where.setdefault(keys(r), set()).add(s)
    straddling = {k: v for k, v in where.items() if len(v) > 1}
    assert not straddling, f"{len(straddling)} groups straddle splits, e.g. {next(iter(straddling.items()))}"
    groups = Counter(keys(r) for r in base + twins)
    multi = [n for n in groups.values() if n > 1]
    assert m["near_duplicates"] == {"groups": len(multi), "records": sum(multi)} and len(multi) >= 60
    assert sum(m["counts"][s]["total"] for s in SPLITS) == len(base) + len(twins)  # nothing dropped
    # every twin pair is whole somewhere, and the held-out splits still got (about) their default sizes
    n = len(base) + len(twins)
    assert abs(m["counts"]["test"]["total"] - round(0.10 * n)) <= 2, m["counts"]
    assert abs(m["counts"]["validation"]["total"] - round(0.05 * n)) <= 2, m["counts"]
    assert m["counts"]["test"]["total"] > 0 and set(m["counts"]["test"]["by_category"]) == \
        set(m["counts"]["train"]["by_category"])  # still stratified: every category held out
    again = prepare(source="jsonl", path=write_lines(tmp_path / "e.jsonl", twins + base), out=tmp_path / "again",
                    tokenizer=tok, max_length=512, seed=0)
    for s in SPLITS:  # same records, same seed: same split and order, whatever the input order
        assert [r["id"] for r in read_jsonl(tmp_path / "again" / f"{s}.jsonl")] == \
            [r["id"] for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")]


def test_small_input_ten_records(tmp_path, tok):
    src = write_lines(tmp_path / "ten.jsonl", GOOD[:10])
    rc = main(["prepare", "--source", "jsonl", "--path", str(src), "--tokenizer", str(tok), "--max-length", "256",
               "--out", str(tmp_path / "out"), "--val-size", "2", "--test-size", "2"])
    assert rc == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [m["counts"][s]["total"] for s in SPLITS] == [6, 2, 2]
    assert {r["source_index"] for s in SPLITS for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")} == set(range(1, 11))
    with pytest.raises(DataError, match="leaves no training records"):
        prepare(source="jsonl", path=write_lines(tmp_path / "four.jsonl", GOOD[:4]), out=tmp_path / "o2",
                tokenizer=tok, max_length=256, val_size=2, test_size=2)


def test_output_matches_the_contract(synthetic_data_dir, tiny_model_dir):
    """The conftest's session data dir (600 synthetic records, 48/48): manifest vs files vs tokenized."""
    import datasets

    d = synthetic_data_dir
    m = json.loads((d / "manifest.json").read_text())
    assert (m["schema_version"], m["source"], m["seed"], m["max_length"]) == (1, "synthetic", 0, 512)
    tok_file = Path(m["tokenizer"]["file"])
    assert tok_file.parent == tiny_model_dir.resolve()
    assert m["tokenizer"]["sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    assert [m["counts"][s]["total"] for s in SPLITS] == [504, 48, 48]
    assert m["skipped"] == {} and m["dropped_too_long"] == 0
    encoder = PromptEncoder(tiny_model_dir)
    all_ids = []
    for s in SPLITS:
        path = d / m["splits"][s]["file"]
        assert m["splits"][s]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        records = read_jsonl(path)
        assert len(records) == m["counts"][s]["total"]
        assert dict(Counter(r["category"] for r in records)) == m["counts"][s]["by_category"]
        for r in records:
            assert set(r) == {"id", "category", "instruction", "context", "response"}
            assert re.fullmatch(r"dolly-[0-9a-f]{12}", r["id"]) and r["id"] == record_id(r)
        all_ids += [r["id"] for r in records]
        if s == "test":
            assert not (d / "tokenized" / "test").exists()
            continue
        ds = datasets.load_from_disk(str(d / "tokenized" / s))
        assert ds.column_names == ["id", "category", "input_ids", "labels"]
        assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["labels"].feature.dtype == "int32"
        assert ds["id"] == [r["id"] for r in records] and ds["category"] == [r["category"] for r in records]
        for r, row, enc in zip(records, ds, encoder.encode_examples(records)):
            assert row["input_ids"] == enc.input_ids and row["labels"] == enc.labels
            cut = enc.input_ids.index(encoder.end_inst_id) + 1  # the prompt ends with [/INST]
            assert row["labels"][:cut] == [IGNORE_INDEX] * cut
    assert len(all_ids) == len(set(all_ids)) == 600


def test_hub_source_through_datasets_load_dataset_on_local_files(tmp_path, tok):
    repo = tmp_path / "databricks-dolly-15k"  # a local copy of the dataset repo: one jsonl file
    repo.mkdir()
    write_lines(repo / "databricks-dolly-15k.jsonl", GOOD)
    m = prepare(source="hub", path=repo, out=tmp_path / "hub", tokenizer=tok, max_length=512, val_size=4, test_size=4)
    assert (m["source"], m["source_path"]) == ("hub", str(repo.resolve()))
    # same records through the jsonl reader: same ids, same split; hub keeps the 0-based row, jsonl the line
    prepare(source="jsonl", path=repo / "databricks-dolly-15k.jsonl", out=tmp_path / "jl", tokenizer=tok,
            max_length=512, val_size=4, test_size=4)
    for s in SPLITS:
        hub, jl = read_jsonl(tmp_path / "hub" / f"{s}.jsonl"), read_jsonl(tmp_path / "jl" / f"{s}.jsonl")
        assert [r["id"] for r in hub] == [r["id"] for r in jl]
        assert [r["source_index"] + 1 for r in hub] == [r["source_index"] for r in jl]
    # a single file works too (the "json" builder); --num-examples keeps the first N
    m2 = prepare(source="hub", path=repo / "databricks-dolly-15k.jsonl", out=tmp_path / "hub2", tokenizer=tok,
                 max_length=512, num_examples=12, val_size=2, test_size=2)
    assert sum(m2["counts"][s]["total"] for s in SPLITS) == 12


def test_hub_source_never_falls_back(tmp_path, tok):
    with pytest.raises(DataError, match="no such file or directory"):
        prepare(source="hub", path=tmp_path / "nope", out=tmp_path / "o", tokenizer=tok, max_length=512)
    # offline (HF_HUB_OFFLINE=1 in tests): the real hub id fails with a message naming it, not with synthetic data
    with pytest.raises(DataError, match="databricks/databricks-dolly-15k: datasets.load_dataset failed"):
        prepare(source="hub", out=tmp_path / "o", tokenizer=tok, max_length=512)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,message", [
    (["--source", "jsonl"], "--source jsonl needs --path"),
    (["--source", "synthetic", "--path", "x.jsonl"], "takes no --path"),
    (["--source", "jsonl", "--path", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--source", "jsonl", "--path", "x.jsonl", "--profile", "dolly"], "applies to --source synthetic only"),
    (["--source", "synthetic", "--num-examples", "0"], "--num-examples must be at least 1"),
])
def test_bad_arguments_exit_2(tmp_path, tok, capsys, argv, message):
    rc = main(["prepare", *argv, "--tokenizer", str(tok), "--max-length", "64", "--out", str(tmp_path / "o")])
    assert rc == 2 and message in capsys.readouterr().err


def test_missing_tokenizer_and_required_options_exit_2(tmp_path, capsys):
    assert main(["prepare", "--source", "synthetic", "--tokenizer", str(tmp_path), "--max-length", "64",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["prepare", "--source", "synthetic", "--max-length", "64", "--out", str(tmp_path / "o")]) == 2
    assert "missing --tokenizer" in capsys.readouterr().err


def test_config_file_with_command_line_overrides(tmp_path, tok):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text(yaml.safe_dump({"source": "synthetic", "num-examples": 80, "tokenizer": str(tok),
                                   "max_length": 256, "out": str(tmp_path / "from-config"), "seed": 2,
                                   "val_size": 5, "test-size": 5}))
    assert main(["prepare", "--config", str(cfg), "--num-examples", "60", "--test-size", "7"]) == 0
    m = json.loads((tmp_path / "from-config" / "manifest.json").read_text())
    assert [m["counts"][s]["total"] for s in SPLITS] == [48, 5, 7] and m["seed"] == 2
    cfg.write_text(yaml.safe_dump({"source": "synthetic", "max_len": 256}))
    assert main(["prepare", "--config", str(cfg), "--tokenizer", str(tok), "--out", str(tmp_path / "x")]) == 2
    cfg.write_text(yaml.safe_dump({"max_length": "long"}))
    assert main(["prepare", "--config", str(cfg)]) == 2


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--source", "--path", "--num-examples", "--tokenizer", "--max-length", "--out", "--seed",
                 "--val-size", "--test-size", "--skip-invalid", "--config"):
        assert flag in out


def test_out_dir_is_replaced_whole(tmp_path, tok):
    out = tmp_path / "data"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    prepare(source="synthetic", out=out, tokenizer=tok, max_length=256, num_examples=30, val_size=3, test_size=3)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.jsonl", "tokenized", "train.jsonl",
                                                      "validation.jsonl"]
    assert out.stat().st_mode & 0o777 == 0o755  # readable by the other users of a shared volume
    before = (out / "train.jsonl").read_bytes()
    with pytest.raises(DataError):  # a failed run leaves the previous output as it was
        prepare(source="synthetic", out=out, tokenizer=tok, max_length=256, num_examples=4, val_size=2, test_size=2)
    assert (out / "train.jsonl").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_split_that_cannot_hold_out_a_near_duplicate_group_fails(tmp_path, tok):
    """Four records that are one question (four responses): no held-out split can take the group without
    straddling, so a requested validation/test split cannot be filled: a clear error, not an empty split."""
    rows = [{"instruction": "Name a colour.", "context": "", "response": r, "category": "open_qa"}
            for r in ("Red.", "Blue.", "Green.", "Teal.")]
    with pytest.raises(DataError, match="near-duplicate group"):
        prepare(source="jsonl", path=write_lines(tmp_path / "one.jsonl", rows), out=tmp_path / "out",
                tokenizer=tok, max_length=256, val_size=1, test_size=1)
    assert not (tmp_path / "out").exists()
