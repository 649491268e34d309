"""Deterministic, category-stratified train/validation/test split that never separates near-duplicates.

De-duplication (`trainer.data.prepare.collect`) drops exact copies only. Crowd-written data repeats popular
questions: one instruction (+ context) with two different responses is two records, and if one sat in train and
the other in test, the test would score a prompt the model was trained on. So records are first grouped by
`group_key` (instruction and context, case-folded, whitespace collapsed), and a group moves as a whole.

Groups are ordered by their smallest id (so the input order does not matter), shuffled per category with the
seed (a group counts under the category of its smallest-id record), and the held-out sizes are shared out over
the categories by largest remainder: each category gets its share of validation and test as far as its count
allows. Within a category, groups fill test, then validation, in shuffled order, each taking a group only while
it fits the category's share; a group larger than what is left stays in train. With no near-duplicates this is
exactly the per-record split; with them a held-out split can come out a record or two short of its size. The
split is the same for the same records and seed.
"""

from __future__ import annotations

import json
import random

from trainer.data.records import DataError

SPLITS = ("train", "validation", "test")
VAL_FRACTION, VAL_CAP = 0.05, 500
TEST_FRACTION, TEST_CAP = 0.10, 1500


def default_sizes(n: int) -> tuple[int, int]:
    """5% validation (at most 500) and 10% test (at most 1,500), at least one each when n >= 3."""
    if n < 3:
        return 0, 0
    return min(VAL_CAP, max(1, round(VAL_FRACTION * n))), min(TEST_CAP, max(1, round(TEST_FRACTION * n)))


def allocate(total: int, capacity: dict[str, int]) -> dict[str, int]:
    """Share `total` over the keys in proportion to `capacity` (largest remainder, ties by name), never more
    than a key's capacity."""
    n = sum(capacity.values())
    if total > n:
        raise ValueError(f"cannot take {total} of {n}")
    quota = {k: total * c / n if n else 0.0 for k, c in capacity.items()}
    out = {k: min(capacity[k], int(q)) for k, q in quota.items()}
    while sum(out.values()) < total:
        # the key furthest below its quota that still has room
        k = max((k for k in sorted(capacity) if out[k] < capacity[k]), key=lambda k: quota[k] - out[k])
        out[k] += 1
    return out


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def group_key(record: dict) -> str:
    """What makes two records near-duplicates: the same instruction and context up to case and whitespace."""
    return json.dumps([_normalize(record["instruction"]), _normalize(record.get("context", ""))], ensure_ascii=False)


def near_duplicate_groups(records: list[dict]) -> list[list[dict]]:
    """Records grouped by `group_key`, each group sorted by id, groups ordered by their first id."""
    groups: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["id"]):
        groups.setdefault(group_key(r), []).append(r)
    return sorted(groups.values(), key=lambda g: g[0]["id"])


def split_records(records: list[dict], seed: int, val_size: int | None = None,
                  test_size: int | None = None) -> dict[str, list[dict]]:
    """records (each with `id`, `category`, `instruction`, `context`) -> {"train": [...], "validation": [...],
    "test": [...]}; records sharing a `group_key` always land in the same split."""
    n = len(records)
    if n < 3 and (val_size is None or test_size is None):
        raise DataError(
            f"{n} usable record{'s' if n != 1 else ''}: the default split needs at least 3 (one each for train, "
            f"validation and test); add records, or set --val-size and --test-size explicitly", "split")
    default_val, default_test = default_sizes(n)
    val_size = default_val if val_size is None else val_size
    test_size = default_test if test_size is None else test_size
    if val_size < 0 or test_size < 0:
        raise DataError(f"split sizes must not be negative (val_size={val_size}, test_size={test_size})", "split")
    if val_size + test_size >= n:
        raise DataError(
            f"val_size {val_size} + test_size {test_size} leaves no training records out of {n} usable records",
            "split",
        )
    # category -> its near-duplicate groups (lists of records), shuffled
    groups: dict[str, list[list[dict]]] = {}
    for g in near_duplicate_groups(records):
        groups.setdefault(g[0]["category"], []).append(g)
    for category, units in groups.items():
        random.Random(f"{seed}:{category}").shuffle(units)

    # Hold out at most all-but-one record per category first, so that training sees every category, and
    # only then (tiny inputs) the last records of some categories.
    sizes = {c: sum(len(g) for g in units) for c, units in groups.items()}
    room = {c: k - 1 for c, k in sizes.items()}
    held = allocate(min(val_size + test_size, sum(room.values())), room)
    extra = allocate(val_size + test_size - sum(held.values()), {c: sizes[c] - held[c] for c in groups})
    held = {c: held[c] + extra[c] for c in groups}
    test_k = allocate(test_size, held)
    val_k = {c: held[c] - test_k[c] for c in groups}
    out = {s: [] for s in SPLITS}
    for c, units in groups.items():
        room = {"test": test_k[c], "validation": val_k[c]}
        for g in units:
            name = next((s for s in ("test", "validation") if len(g) <= room[s]), "train")
            if name != "train":
                room[name] -= len(g)
            out[name] += g
    for name, size in (("validation", val_size), ("test", test_size)):
        if size and not out[name]:
            raise DataError(
                f"{name}: {size} records requested, but every near-duplicate group (records sharing instruction + "
                f"context) is larger than its share, so none fits: {n} records in {sum(map(len, groups.values()))} "
                f"groups. Add records or raise --val-size / --test-size", "split")
    for name in SPLITS:  # interleave categories, deterministically
        out[name].sort(key=lambda r: r["id"])
        random.Random(f"{seed}:{name}").shuffle(out[name])
    return out
