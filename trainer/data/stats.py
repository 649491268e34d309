"""`dolly-train data-stats`: token lengths and packing efficiency of a prepared data dir.

    dolly-train data-stats --data data/synthetic                     # -> data/synthetic/stats/
    dolly-train data-stats --data /mnt/dolly/data/dolly --max-length 2048 --out reports/data

Writes `stats.json` (per split and category: count, mean, p50, p90, p99, max tokens; packing efficiency)
and `lengths.png` (histograms). Lengths are of the full example (prompt + response + </s>), from the
tokenized splits; the test split is encoded with `trainer.prompt.PromptEncoder` from the manifest's tokenizer
when that file is still there.

Packing efficiency = real tokens / tokens the model computes on: `pack_rows` rows of `max_length` versus
batches padded to their longest example (the trainer's `data.packing: false`), in the split's order.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from trainer.data.prepare import resolve_options
from trainer.data.records import DataError
from trainer.log import datasets_progress_bars

PERCENTILES = (50, 90, 99)


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    import numpy as np

    a = np.asarray(lengths)
    out = {"count": int(a.size), "mean": round(float(a.mean()), 1)}
    out.update({f"p{q}": int(np.percentile(a, q, method="inverted_cdf")) for q in PERCENTILES})
    out["max"] = int(a.max())
    return out


def _read_manifest(data: Path) -> dict:
    path = data / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; --data must be a dir written by `dolly-train prepare`", "io")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})", "io") from e


def split_lengths(data: Path, manifest: dict) -> dict[str, tuple[list[str], list[int]]]:
    """split -> (categories, token lengths), one entry per example, in the split's order."""
    import datasets

    import pyarrow.compute as pc

    datasets_progress_bars()

    out = {}
    for name in ("train", "validation"):
        path = data / "tokenized" / name
        if not path.is_dir():
            raise DataError(f"{path}: missing (tokenized split from `dolly-train prepare`)", "io")
        table = datasets.load_from_disk(str(path)).data
        out[name] = (table.column("category").to_pylist(),
                     pc.list_value_length(table.column("input_ids")).to_pylist())
    tokenizer = Path((manifest.get("tokenizer") or {}).get("file", ""))
    test = data / "test.jsonl"
    if test.is_file() and tokenizer.is_file():
        from trainer.prompt import PromptEncoder

        # "\n" only: str.splitlines() would also split at U+2028 inside a record's text
        records = [json.loads(line) for line in test.read_text(encoding="utf-8").split("\n") if line.strip()]
        encoded = PromptEncoder(tokenizer.parent).encode_examples(records)
        out["test"] = ([r["category"] for r in records], [len(e.input_ids) for e in encoded])
    return out


def packing_efficiency(lengths: list[int], max_length: int, batch_size: int) -> dict:
    from trainer.data.packing import pack_rows

    fits = [n for n in lengths if n <= max_length]
    real = sum(fits)
    rows = pack_rows(fits, max_length) if fits else []
    batches = [fits[i : i + batch_size] for i in range(0, len(fits), batch_size)]
    padded = sum(max(b) * len(b) for b in batches)
    return {
        "max_length": max_length,
        "examples": len(fits),
        "longer_than_max_length": len(lengths) - len(fits),
        "real_tokens": real,
        "packed": {"rows": len(rows), "row_tokens": len(rows) * max_length,
                   "efficiency": round(real / (len(rows) * max_length), 4) if rows else None},
        "padded": {"batch_size": batch_size, "batches": len(batches), "row_tokens": padded,
                   "efficiency": round(real / padded, 4) if padded else None},
    }


def compute_stats(data: Path, max_length: int | None = None, batch_size: int = 8) -> tuple[dict, dict]:
    manifest = _read_manifest(data)
    max_length = max_length or manifest.get("max_length")
    if not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"{data / 'manifest.json'}: field 'max_length' is {max_length!r}; pass --max-length", "io")
    lengths = split_lengths(data, manifest)
    stats = {"data": str(data.resolve()), "max_length": max_length, "splits": {}, "packing": {}, "notes": []}
    if "test" not in lengths:
        stats["notes"].append(f"test split left out: tokenizer {manifest.get('tokenizer', {}).get('file')} "
                              "from the manifest is not there to encode test.jsonl")
    for name, (categories, ns) in lengths.items():
        by_cat = {}
        for c, n in zip(categories, ns):
            by_cat.setdefault(c, []).append(n)
        stats["splits"][name] = {"all": length_stats(ns),
                                 "by_category": {c: length_stats(v) for c, v in sorted(by_cat.items())}}
        stats["packing"][name] = packing_efficiency(ns, max_length, batch_size)
    return stats, lengths


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the report from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(lengths: dict, stats: dict, path: Path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    top = max((max(ns) for _, ns in lengths.values() if ns), default=1)
    bins = np.linspace(0, top + 1, 60)
    for name, (_, ns) in lengths.items():
        ax1.hist(ns, bins=bins, alpha=0.55, label=f"{name} ({len(ns)})")
    ax1.axvline(stats["max_length"], color="k", ls="--", lw=1, label=f"max_length {stats['max_length']}")
    ax1.set(yscale="log", xlabel="tokens per example", ylabel="examples", title="Token lengths by split")
    ax1.legend()
    cats, ns = lengths["train"]
    names = sorted(set(cats))
    ax2.boxplot([[n for c, n in zip(cats, ns) if c == k] for k in names], vert=False)
    ax2.set_yticks(range(1, len(names) + 1), names)
    eff = stats["packing"]["train"]
    ax2.set(xscale="log", xlabel="tokens per example",
            title=f"train by category; packing {eff['packed']['efficiency']} vs padding {eff['padded']['efficiency']}")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def data_stats(data, max_length: int | None = None, out=None, batch_size: int = 8) -> dict:
    data = Path(data)
    out = Path(out) if out else data / "stats"
    stats, lengths = compute_stats(data, max_length, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "stats.json", lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=2) + "\n"))
    plot(lengths, stats, out / "lengths.png")
    return stats


# ---- CLI ----------------------------------------------------------------------------------------------

OPTIONS = {"data": (str, None), "max_length": (int, None), "out": (str, None), "batch_size": (int, 8)}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data-stats",
        help="token length distribution and packing efficiency of a prepared data dir",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--config", help="YAML file with any of these options (command-line flags win)")
    p.add_argument("--data", help="data dir written by `dolly-train prepare` (required)")
    p.add_argument("--max-length", type=int, help="row length for packing (default: the manifest's max_length)")
    p.add_argument("--out", help="where stats.json and lengths.png go (default: DATA/stats)")
    p.add_argument("--batch-size", type=int, help="examples per padded batch, for the comparison (default 8)")
    p.set_defaults(func=run)


def _options(args) -> dict:
    return resolve_options(args, OPTIONS, required=("data",))


def run(args) -> int:
    try:
        options = _options(args)
        stats = data_stats(**options)
    except DataError as e:
        print(f"dolly-train data-stats: error: {e}", file=sys.stderr)
        return 2
    for name, s in stats["splits"].items():
        a = s["all"]
        print(f"{name:>10}: {a['count']:6d} examples, tokens mean {a['mean']} p50 {a['p50']} p90 {a['p90']} "
              f"p99 {a['p99']} max {a['max']}")
    eff = stats["packing"]["train"]
    print(f"train at {stats['max_length']} tokens: packing efficiency {eff['packed']['efficiency']}, "
          f"padding to longest (batch {eff['padded']['batch_size']}) {eff['padded']['efficiency']}")
    print(f"wrote {Path(options['out'] or Path(options['data']) / 'stats')}/stats.json and lengths.png")
    return 0
