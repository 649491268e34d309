"""Deterministic, category-stratified train/validation/test split.

Records are ordered by id (so the input order does not matter), shuffled per category with the seed, and the
held-out sizes are shared out over the categories by largest remainder: each category gets its share of
validation and test as far as its count allows, and the split is the same for the same records and seed.
"""

from __future__ import annotations

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


def split_records(records: list[dict], seed: int, val_size: int | None = None,
                  test_size: int | None = None) -> dict[str, list[dict]]:
    """records (each with `id` and `category`) -> {"train": [...], "validation": [...], "test": [...]}."""
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
    groups: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["id"]):
        groups.setdefault(r["category"], []).append(r)
    for category, group in groups.items():
        random.Random(f"{seed}:{category}").shuffle(group)

    # Hold out at most all-but-one record per category first, so that training sees every category, and
    # only then (tiny inputs) the last records of some categories.
    sizes = {c: len(g) for c, g in groups.items()}
    room = {c: k - 1 for c, k in sizes.items()}
    held = allocate(min(val_size + test_size, sum(room.values())), room)
    extra = allocate(val_size + test_size - sum(held.values()), {c: sizes[c] - held[c] for c in groups})
    held = {c: held[c] + extra[c] for c in groups}
    test_k = allocate(test_size, held)
    val_k = {c: held[c] - test_k[c] for c in groups}
    out = {s: [] for s in SPLITS}
    for c, group in groups.items():
        out["test"] += group[: test_k[c]]
        out["validation"] += group[test_k[c] : test_k[c] + val_k[c]]
        out["train"] += group[test_k[c] + val_k[c] :]
    for name in SPLITS:  # interleave categories, deterministically
        out[name].sort(key=lambda r: r["id"])
        random.Random(f"{seed}:{name}").shuffle(out[name])
    return out
