"""Data-pipeline throughput: tokenize and pack 15,000 Dolly-length records (the size of Dolly-15k).

    python bench/data_throughput.py                       # or: make bench-data
    python bench/data_throughput.py --num-records 15000 --max-length 2048 --tokenizer models/tiny

Records come from the synthetic generator's "dolly" profile (Dolly-15k's length distribution: median ~120
tokens, p99 ~1,300, a few past 4,000). The timed part is what `dolly-train prepare` and the trainer do with
them: content ids, `PromptEncoder` batch encoding, the over-long filter (`tokenize`) and `pack_rows` into
rows of --max-length. Budget: 30 s on the 2-core build machine; exit status 1 when it is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.data.packing import pack_rows  # noqa: E402
from trainer.data.prepare import tokenize  # noqa: E402
from trainer.data.records import record_id  # noqa: E402
from trainer.data.synthetic import generate  # noqa: E402
from trainer.prompt import PromptEncoder  # noqa: E402

DEFAULTS = {"num_records": 15_000, "max_length": 2048, "tokenizer": None, "seed": 0, "budget_s": 30.0}


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML with any of the options below (command-line flags win)")
    p.add_argument("--num-records", type=int, help=f"records to generate (default {DEFAULTS['num_records']})")
    p.add_argument("--max-length", type=int, help=f"packed row length (default {DEFAULTS['max_length']})")
    p.add_argument("--tokenizer", help="folder with the Mistral v3 tokenizer.model (default: mistral-common's copy)")
    p.add_argument("--seed", type=int, help="generator seed (default 0)")
    p.add_argument("--budget-s", type=float, help=f"time budget in seconds (default {DEFAULTS['budget_s']})")
    args = p.parse_args(argv)
    options = dict(DEFAULTS)
    if args.config:
        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = sorted(set(k.replace("-", "_") for k in cfg) - set(DEFAULTS))
        if unknown:
            p.error(f"{args.config}: unknown option {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
        options.update({k.replace("-", "_"): v for k, v in cfg.items()})
    options.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    return options


def tokenizer_dir(path: str | None, scratch: Path) -> Path:
    if path:
        return Path(path)
    from trainer.tiny_model import write_tokenizer

    write_tokenizer(scratch)  # the real v3 tokenizer from mistral-common, without building a model
    return scratch


def main(argv=None) -> int:
    o = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        encoder = PromptEncoder(tokenizer_dir(o["tokenizer"], Path(scratch)))
        t0 = time.perf_counter()
        records = generate(o["num_records"], seed=o["seed"], profile="dolly")
        t_gen = time.perf_counter() - t0
        print(f"generated {len(records)} Dolly-length records in {t_gen:.1f} s (not timed)", flush=True)

        t0 = time.perf_counter()
        for r in records:
            r["id"] = record_id(r)
        kept, encoded, too_long = tokenize(records, encoder, o["max_length"])
        t_tok = time.perf_counter() - t0
        lengths = [len(e["input_ids"]) for e in encoded]
        t1 = time.perf_counter()
        rows = pack_rows(lengths, o["max_length"])
        t_pack = time.perf_counter() - t1

    total = t_tok + t_pack
    tokens = sum(lengths)
    result = {
        "records": len(records), "tokenized_tokens": tokens, "dropped_too_long": too_long,
        "tokenize_s": round(t_tok, 2), "pack_s": round(t_pack, 2), "total_s": round(total, 2),
        "tokens_per_s": round(tokens / t_tok), "rows": len(rows),
        "packing_efficiency": round(tokens / (len(rows) * o["max_length"]), 4),
        "budget_s": o["budget_s"], "met_budget": total < o["budget_s"],
    }
    print(f"tokenize {t_tok:.1f} s ({result['tokens_per_s']:,} tokens/s), pack {t_pack:.2f} s "
          f"({len(rows)} rows of {o['max_length']}, efficiency {result['packing_efficiency']:.3f}); "
          f"{too_long} longer than {o['max_length']} dropped")
    verdict = "met" if result["met_budget"] else "MISSED"
    print(f"total {total:.1f} s for {len(records):,} records: {verdict} the {o['budget_s']:.0f} s budget")
    print(json.dumps(result))
    return 0 if result["met_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
