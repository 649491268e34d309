"""`dolly-train prepare`: Dolly records -> validated, deduplicated, split, tokenized data dir.

    dolly-train prepare --source synthetic --tokenizer models/tiny --max-length 512 --out data/synthetic
    dolly-train prepare --source hub --tokenizer /mnt/dolly/models/mistral-7b --max-length 2048 --out /mnt/dolly/data/dolly
    dolly-train prepare --source jsonl --path dolly.jsonl --skip-invalid --config prepare.yaml ...

Steps: read the source -> validate each record (DataError naming file, line and field; `--skip-invalid`
counts and skips instead) -> drop duplicates (same content = same id) -> stratified split that keeps
near-duplicates (same instruction + context up to case and whitespace) together -> tokenize with
`trainer.prompt.PromptEncoder` -> drop train/validation examples longer than `--max-length` (counted per
split) -> write everything into a temp dir that replaces `--out` in one rename. The output format is
docs/CONTRACTS.md's "Prepared data dir".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

import yaml

from trainer.atomic import atomic_dir
from trainer.data.records import SOURCES, DataError, Raw, read_hub, read_jsonl, record_id, validate
from trainer.data.split import SPLITS, near_duplicate_groups, split_records
from trainer.data.synthetic import read_synthetic
from trainer.log import datasets_progress_bars, get_logger
from trainer.prompt import PromptEncoder

log = get_logger(__name__)

SCHEMA_VERSION = 1
SYNTHETIC_DEFAULT_EXAMPLES = 2000
TOKENIZED_SPLITS = ("train", "validation")  # the evaluator encodes test.jsonl's prompts itself
ENCODE_BATCH = 1024
MAX_SKIP_WARNINGS = 20  # one line per skipped record up to this many; the manifest counts them all


def sha256_file(path: Path) -> str:
    """The manifest's digest of a file (also the evaluator's check of model and data files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


# ---- the pipeline -------------------------------------------------------------------------------------

def _sources(source: str, path, num_examples: int | None, seed: int, profile: str) -> Iterable[Raw]:
    if source not in SOURCES:
        raise DataError(f"--source {source!r} is not one of {', '.join(SOURCES)}", "args")
    if source == "jsonl":
        if path is None:
            raise DataError("--source jsonl needs --path FILE", "args")
        return read_jsonl(path)
    if source == "hub":
        return read_hub(path)
    if path is not None:
        raise DataError(f"--source synthetic takes no --path (got {path}); the generator is embedded", "args")
    return read_synthetic(num_examples or SYNTHETIC_DEFAULT_EXAMPLES, seed, profile)


def collect(raws: Iterable[Raw], skip_invalid: bool, num_examples: int | None) -> tuple[list[dict], Counter]:
    """Valid, unique records (the first `num_examples` of them when set) and skip counts per reason."""
    records, seen, skipped = [], set(), Counter()
    for raw in raws:
        try:
            record = validate(raw)
        except DataError as e:
            if not skip_invalid:
                raise
            skipped[e.reason] += 1
            if sum(skipped.values()) <= MAX_SKIP_WARNINGS:
                log.warning("skipped: %s", e)
            continue
        rid = record_id(record)
        if rid in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(rid)
        out = {"id": rid, "category": record["category"], "instruction": record["instruction"],
               "context": record["context"], "response": record["response"]}
        if raw.index is not None:
            out["source_index"] = raw.index
        records.append(out)
        if num_examples and len(records) >= num_examples:
            break
    return records, skipped


def tokenize(records: list[dict], encoder: PromptEncoder, max_length: int) -> tuple[list[dict], list[dict], int]:
    """(kept records, their encodings, number dropped for being longer than max_length)."""
    from tqdm import tqdm

    kept, encoded, too_long = [], [], 0
    start_time = time.perf_counter()
    with tqdm(total=len(records), desc="tokenize", unit="rec", disable=None) as bar:
        for start in range(0, len(records), ENCODE_BATCH):
            batch = records[start : start + ENCODE_BATCH]
            for record, enc in zip(batch, encoder.encode_examples(batch)):
                if len(enc.input_ids) > max_length:
                    too_long += 1
                    continue
                kept.append(record)
                encoded.append({"id": record["id"], "category": record["category"],
                                "input_ids": enc.input_ids, "labels": enc.labels})
            bar.update(len(batch))
    log.info("tokenized %d records in %.1f s", len(records), time.perf_counter() - start_time)
    return kept, encoded, too_long


def split_then_cap(records: list[dict], encoder: PromptEncoder, max_length: int, seed: int, val_size: int | None,
                   test_size: int | None) -> tuple[dict[str, list[dict]], list[dict], dict[str, int], int]:
    """Split first, then apply the length cap to the training side only.

    Dropping over-long examples before the split would shift the test set towards short examples and make
    its composition depend on the training cap. So the split sees every valid record; train and validation
    then lose (and count) their examples longer than `max_length`; the test split keeps all of its records
    (the evaluator fits an over-long prompt into its own max_model_len by cutting the context, counted in
    its metrics.json), and how many of them exceed `max_length` is counted here.
    Returns (splits, encodings of the kept train/validation records, dropped per split, test over the cap)."""
    splits = split_records(records, seed, val_size, test_size)
    encoded, dropped = [], {}
    for name in TOKENIZED_SPLITS:
        splits[name], enc, dropped[name] = tokenize(splits[name], encoder, max_length)
        encoded += enc
        if dropped[name]:
            log.warning("dropped %d %s examples longer than --max-length %d tokens", dropped[name], name, max_length)
    if not splits["train"]:
        raise DataError(f"every training example is longer than --max-length {max_length} tokens", "empty")
    test_over = sum(1 for e in encoder.encode_examples(splits["test"]) if len(e.input_ids) > max_length)
    if test_over:
        log.info("kept %d test examples longer than --max-length %d (the split does not depend on the cap)",
                 test_over, max_length)
    return splits, encoded, dropped, test_over


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _save_tokenized(path: Path, rows: list[dict]) -> None:
    import datasets

    datasets_progress_bars()

    features = datasets.Features({
        "id": datasets.Value("string"),
        "category": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
    })
    columns = {k: [r[k] for r in rows] for k in features}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))


def write_out(out: Path, splits: dict[str, list[dict]], encoded: dict[str, dict], manifest: dict) -> None:
    """Everything into a temp dir beside `out`, then one rename (the old dir is removed only after it)."""
    with atomic_dir(out) as tmp:
        manifest["splits"] = {}
        for name in SPLITS:
            _write_jsonl(tmp / f"{name}.jsonl", splits[name])
            manifest["splits"][name] = {"file": f"{name}.jsonl", "sha256": sha256_file(tmp / f"{name}.jsonl")}
        for name in TOKENIZED_SPLITS:
            _save_tokenized(tmp / "tokenized" / name, [encoded[r["id"]] for r in splits[name]])
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def prepare(source: str, out, tokenizer, max_length: int, path=None, num_examples: int | None = None,
            seed: int = 0, val_size: int | None = None, test_size: int | None = None,
            skip_invalid: bool = False, profile: str = "learnable") -> dict:
    """Run the whole pipeline; returns the manifest written to `out/manifest.json`."""
    if max_length < 8:
        raise DataError(f"--max-length must be at least 8, got {max_length}", "args")
    if profile != "learnable" and source != "synthetic":
        raise DataError(f"--profile {profile} applies to --source synthetic only (got --source {source})", "args")
    if num_examples is not None and num_examples < 1:
        raise DataError(f"--num-examples must be at least 1, got {num_examples}", "args")
    try:
        encoder = PromptEncoder(tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"--tokenizer: {e}", "args") from e

    records, skipped = collect(_sources(source, path, num_examples, seed, profile), skip_invalid, num_examples)
    if not records:
        raise DataError(f"{path or source}: no valid records", "empty")
    log.info("read %d unique valid records from %s%s", len(records), source, f" ({path})" if path else "")
    splits, encoded, dropped, test_over = split_then_cap(records, encoder, max_length, seed, val_size, test_size)
    too_long = sum(dropped.values())
    multi = [g for g in near_duplicate_groups(records) if len(g) > 1]
    if multi:
        log.info("kept %d near-duplicate groups (%d records: same instruction + context, other responses) each "
                 "within one split", len(multi), sum(map(len, multi)))

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "source_path": str(Path(path).resolve()) if path is not None else None,
        "seed": seed,
        "max_length": max_length,
        "tokenizer": {"file": str(encoder.model_file.resolve()), "sha256": sha256_file(encoder.model_file)},
        "counts": {name: {"total": len(rs), "by_category": dict(sorted(Counter(r["category"] for r in rs).items()))}
                   for name, rs in splits.items()},
        "skipped": dict(sorted(skipped.items())),
        "dropped_too_long": too_long,
        "dropped_too_long_by_split": dropped,
        "test_longer_than_max_length": test_over,
        # records sharing instruction + context (case-folded, whitespace collapsed): each group is in one split
        "near_duplicates": {"groups": len(multi), "records": sum(map(len, multi))},
    }
    if source == "synthetic":
        manifest["synthetic_profile"] = profile
    write_out(Path(out), splits, {e["id"]: e for e in encoded}, manifest)
    return manifest


# ---- CLI ----------------------------------------------------------------------------------------------

# option name -> (type, default); also the keys a --config YAML may hold (dashes or underscores)
OPTIONS = {
    "source": (str, None), "path": (str, None), "num_examples": (int, None), "tokenizer": (str, None),
    "max_length": (int, None), "out": (str, None), "seed": (int, 0), "val_size": (int, None),
    "test_size": (int, None), "skip_invalid": (bool, False), "profile": (str, "learnable"),
}
REQUIRED = ("source", "tokenizer", "max_length", "out")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="validate, split and tokenize Dolly (hub, a jsonl file, or the embedded synthetic set)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 ok, 2 bad input (the message names file, line and field).",
    )
    # defaults stay None so that a --config file fills in whatever the command line leaves out
    p.add_argument("--config", help="YAML file with any of these options (command-line flags win)")
    p.add_argument("--source", choices=SOURCES, help="hub: databricks/databricks-dolly-15k via datasets; "
                   "jsonl: a local Dolly-format file; synthetic: the embedded generator (required)")
    p.add_argument("--path", help="jsonl: the file; hub: a local copy (dataset folder or file) instead of the hub")
    p.add_argument("--num-examples", type=int, help="keep the first N valid unique records "
                   f"(synthetic: generate N, default {SYNTHETIC_DEFAULT_EXAMPLES})")
    p.add_argument("--tokenizer", help="folder with the Mistral v3 tokenizer.model, e.g. the model folder (required)")
    p.add_argument("--max-length", type=int, help="drop (and count) train/validation examples longer than this many "
                   "tokens; the test split keeps all of its records (required)")
    p.add_argument("--out", help="output data dir, replaced atomically (required)")
    p.add_argument("--seed", type=int, help="seed for the split and the synthetic generator (default 0)")
    p.add_argument("--val-size", type=int, help="validation records (default 5%%, at most 500)")
    p.add_argument("--test-size", type=int, help="test records (default 10%%, at most 1,500)")
    p.add_argument("--skip-invalid", action="store_true", default=None,
                   help="skip invalid records and count them per reason instead of failing")
    p.add_argument("--profile", choices=("learnable", "dolly"),
                   help="synthetic only: 'learnable' (default) or 'dolly' (Dolly-15k's lengths)")
    p.set_defaults(func=run)


def load_config(path: str, spec: dict = OPTIONS) -> dict:
    """A YAML file of option names (dashes or underscores) -> values, checked against `spec`
    (name -> (type, default)); data-stats reads its config file through this too."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{p}: cannot read config: {e}", "args") from e
    if not isinstance(data, dict):
        raise DataError(f"{p}: expected a mapping of option names to values, got {type(data).__name__}", "args")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in spec:
            raise DataError(f"{p}: unknown option {key!r} (known: {', '.join(spec)})", "args")
        typ = spec[name][0]
        if value is not None and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
            raise DataError(f"{p}: option {key!r} must be {typ.__name__}, got {value!r}", "args")
        out[name] = str(value) if typ is str and value is not None else value
    return out


def resolve_options(args: argparse.Namespace, spec: dict = OPTIONS, required: tuple = REQUIRED) -> dict:
    """defaults < --config file < command-line flags."""
    options = {name: default for name, (_, default) in spec.items()}
    if args.config:
        options.update(load_config(args.config, spec))
    options.update({name: getattr(args, name) for name in spec if getattr(args, name, None) is not None})
    missing = [name for name in required if options[name] is None]
    if missing:
        raise DataError(f"missing --{missing[0].replace('_', '-')} (on the command line or in --config)", "args")
    if "source" in options and options["source"] not in SOURCES:
        raise DataError(f"source {options['source']!r} is not one of {', '.join(SOURCES)}", "args")
    return options


def run(args: argparse.Namespace) -> int:
    try:
        options = resolve_options(args)
        manifest = prepare(**options)
    except DataError as e:
        print(f"dolly-train prepare: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s} {manifest['counts'][s]['total']}" for s in SPLITS)
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items()) or "none"
    print(f"wrote {options['out']}: {counts}; skipped: {skipped}; "
          f"dropped (longer than {manifest['max_length']} tokens): {manifest['dropped_too_long']} "
          f"(train/validation; test keeps its {manifest['test_longer_than_max_length']})")
    return 0
