"""Published evaluation protocols a run can be declared to follow (`protocol:` in the config file).

`minillm`: the Dolly protocol of MiniLLM (Gu et al., "MiniLLM: Knowledge Distillation of Large Language
Models") and the knowledge-distillation papers that reuse its split: 500 held-out examples, sampling at
temperature 1.0 and top-p 1.0, up to 256 new tokens, ROUGE-L (rouge-score, stemming on) averaged over
examples, then the mean over 5 seeds, reported x 100. A run that declares it must use exactly these settings
(checked before the engine starts), and its report states the figures it is comparable to.

The 500 examples are the first 500 of this project's held-out test split (seeded, category-stratified),
not MiniLLM's own 500: the protocol is the same, the examples are a different sample of Dolly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluator.config import EvalInputError

PROTOCOLS = {
    "minillm": {
        "title": "MiniLLM Dolly protocol",
        "settings": {"sampling.temperature": 1.0, "sampling.top_p": 1.0, "sampling.max_new_tokens": 256,
                     "number of sampling.seeds": 5, "limit": 500},
        "published": [
            ("LLaMA-7B, supervised fine-tuning (MiniLLM)", 26.3),
            ("Mistral-7B LoRA SFT teacher (later knowledge-distillation work)", 31.6),
        ],
    },
}


def protocol_settings(cfg) -> dict:
    """The values of the settings a protocol fixes, named as in `PROTOCOLS[...]['settings']`."""
    return {"sampling.temperature": cfg.sampling.temperature, "sampling.top_p": cfg.sampling.top_p,
            "sampling.max_new_tokens": cfg.sampling.max_new_tokens,
            "number of sampling.seeds": len(cfg.sampling.seeds) if not cfg.sampling.greedy else 0,
            "limit": cfg.limit}


def check_protocol(cfg) -> None:
    """EvalInputError naming the first setting that differs from the declared protocol."""
    spec = PROTOCOLS[cfg.protocol]
    have = protocol_settings(cfg)
    for key, want in spec["settings"].items():
        if have[key] != want:
            raise EvalInputError(f"protocol {cfg.protocol}: {key} must be {want}, got {have[key]} "
                                 f"(or set protocol: none)")


def check_protocol_records(cfg, records: list[dict], path: Path) -> None:
    want = PROTOCOLS[cfg.protocol]["settings"]["limit"]
    if len(records) != want:
        raise EvalInputError(f"{path}: protocol {cfg.protocol} needs {want} test records, the split has "
                             f"{len(records)}")


def protocol_record(name: str, metrics: dict) -> dict:
    """metrics.json `protocol`: the headline number computed the way the protocol reports it, and what it
    is comparable to."""
    spec = PROTOCOLS[name]
    per_seed = [100 * v["rougeL"] for v in metrics["per_seed"].values()]
    mean = float(np.mean(per_seed))
    published = [{"model": m, "rougeL": v} for m, v in spec["published"]]
    statement = (f"{spec['title']}: ROUGE-L x 100 = {mean:.1f} (mean over {len(per_seed)} seeds; per-seed "
                 f"{', '.join(f'{x:.1f}' for x in per_seed)}). Settings as in the papers ("
                 + ", ".join(f"{k} {v}" for k, v in spec["settings"].items())
                 + "), so the figure is comparable to their Dolly ROUGE-L: "
                 + "; ".join(f"{p['model']} {p['rougeL']}" for p in published)
                 + ". The 500 examples are this split's, not the papers' own 500.")
    return {"name": name, "settings": spec["settings"], "rougeL_x100": mean, "rougeL_x100_per_seed": per_seed,
            "rougeL_x100_std_over_seeds": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
            "comparable_to": published, "statement": statement}
