"""Dolly records, the data schema: fields and categories, the hub and JSONL sources, validation and stable ids
(the synthetic source is `trainer.data.synthetic.read_synthetic`).

A source yields `Raw` items (where it came from + the parsed object, or the reason it could not be parsed);
`validate()` turns one into a clean record or raises `DataError` naming the file, the line and the field.
No source falls back to another: a missing file or an unreachable hub is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trainer.log import datasets_progress_bars

HUB_DATASET = "databricks/databricks-dolly-15k"
# Dolly-15k's eight categories, most common first (the synthetic generator allocates in this order).
CATEGORIES = ("open_qa", "general_qa", "classification", "closed_qa", "brainstorming", "information_extraction",
              "summarization", "creative_writing")
# The categories Dolly-15k's authors wrote around a reference passage: the synthetic generator gives these a
# context and the others none. Real records need not follow it (a context is optional in every category, and
# validation does not check it).
CONTEXT_CATEGORIES = frozenset({"closed_qa", "information_extraction", "summarization"})
FIELDS = ("instruction", "context", "response", "category")
SOURCES = ("hub", "jsonl", "synthetic")


class DataError(ValueError):
    """Bad input data. `reason` is the key it is counted under when invalid records are skipped."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Raw:
    where: str  # "FILE:LINE" or "DATASET row N": the prefix of every error about this item
    index: int | None  # the source line (jsonl, 1-based) or row (hub, 0-based); None for synthetic
    obj: object = None
    parse_error: str | None = None


def validate(raw: Raw) -> dict:
    """The record with exactly Dolly's four fields, or DataError('<where>: field <f>: ...')."""
    if raw.parse_error is not None:
        raise DataError(f"{raw.where}: malformed JSON: {raw.parse_error}", "malformed_json")
    if not isinstance(raw.obj, dict):
        raise DataError(f"{raw.where}: expected a JSON object, got {type(raw.obj).__name__}", "not_an_object")
    record = {}
    for field in FIELDS:
        value = raw.obj.get(field)
        if field not in raw.obj or value is None:
            raise DataError(f"{raw.where}: field '{field}' is missing", f"missing_{field}")
        if not isinstance(value, str):
            raise DataError(
                f"{raw.where}: field '{field}' must be a string, got {type(value).__name__} {value!r:.60}",
                f"non_string_{field}",
            )
        record[field] = value
    for field in ("instruction", "response"):
        if not record[field].strip():
            raise DataError(f"{raw.where}: field '{field}' is empty", f"empty_{field}")
    if record["category"] not in CATEGORIES:
        raise DataError(
            f"{raw.where}: field 'category': unknown category {record['category']!r:.60} "
            f"(expected one of {', '.join(CATEGORIES)})",
            "unknown_category",
        )
    return record


def record_id(record: dict) -> str:
    """`dolly-<12 hex>` from the content the model sees (outer whitespace is stripped by the prompt too),
    so identical records get identical ids wherever they come from."""
    key = json.dumps([record[f].strip() for f in FIELDS], ensure_ascii=False)
    return "dolly-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


# ---- sources ----------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> Iterator[Raw]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (--source jsonl needs --path to a Dolly-format .jsonl file)", "io")
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline pair) are not records
            where = f"{path}:{lineno}"
            try:
                yield Raw(where, lineno, json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield Raw(where, lineno, parse_error=str(e))


def read_hub(path: str | Path | None = None) -> Iterator[Raw]:
    """Dolly-15k through `datasets.load_dataset`: the hub id by default; `path` points the same call at a
    local copy (a dataset repo folder, or a .jsonl/.json/.parquet file) - the way to run without the hub."""
    import datasets

    datasets_progress_bars()
    if path is None:
        name, kwargs = HUB_DATASET, {}
    else:
        p = Path(path)
        if p.is_dir():
            name, kwargs = str(p), {}
        elif p.is_file():
            builder = "parquet" if p.suffix == ".parquet" else "json"
            name, kwargs = builder, {"data_files": str(p)}
        else:
            raise DataError(f"{p}: no such file or directory (--source hub --path wants a local copy of {HUB_DATASET})", "io")
    try:
        ds = datasets.load_dataset(name, split="train", **kwargs)
    except Exception as e:  # ConnectionError, offline mode, a file datasets cannot parse: all fatal, say which
        raise DataError(f"{name}: datasets.load_dataset failed: {type(e).__name__}: {e}", "io") from e
    missing = [f for f in FIELDS if f not in ds.column_names]
    if missing:
        raise DataError(f"{name}: field '{missing[0]}' is missing (columns: {', '.join(ds.column_names)})",
                        f"missing_{missing[0]}")
    for i, row in enumerate(ds):
        yield Raw(f"{name} row {i}", i, row)

