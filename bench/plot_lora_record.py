"""The LoRA / QLoRA GPU record as one picture: real tokens/s per logged window of the Ray runs against issue 25's
bars, and each run's measured GPU peak beside its preflight estimate.

    python bench/plot_lora_record.py docs/benchmarks/run12-h100-lora-ray   # writes lora-record.svg there
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUNS = [("lora-1gpu 2x8", "lora-1gpu-metrics.jsonl", 10_000),
        ("lora-1gpu 2x8 rerun", "lora-1gpu-rerun-2x8-metrics.jsonl", 10_000),
        ("lora-1gpu 3x5 (preset)", "lora-1gpu-3x5-metrics.jsonl", 10_000),
        ("qlora-24gb", "qlora-24gb-metrics.jsonl", 4_000)]
COLORS = ("tab:blue", "tab:cyan", "tab:purple", "tab:orange")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("record_dir", type=Path)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    peaks, estimates = [], []
    for (name, file, bar), color in zip(RUNS, COLORS):
        rows = [json.loads(x) for x in (args.record_dir / file).read_text().splitlines() if x.strip()]
        train = [r for r in rows if r["kind"] == "train"]
        pre = next(r for r in rows if r["kind"] == "preflight")
        speed.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], "o-", color=color, label=name)
        speed.axhline(bar, color="tab:red", linestyle=":", linewidth=1)
        speed.annotate(f"bar {bar:,}", (train[0]["step"], bar), textcoords="offset points", xytext=(0, 4),
                       color="tab:red", fontsize=8)
        peaks.append(max(r["gpu_mem_peak_gb"] for r in train))
        estimates.append(pre["mem_estimate_total_gib"])
    speed.set_xlabel("optimizer step (30-32k tokens each)")
    speed.set_ylabel("real tokens/s (one H100, Ray Train)")
    speed.set_ylim(bottom=0)
    speed.legend(loc="lower right", fontsize=8)
    speed.set_title("Throughput per logged window (the first includes compilation)", fontsize=9)
    x = range(len(RUNS))
    memory.bar([i - 0.2 for i in x], estimates, width=0.4, label="preflight estimate", color="tab:gray")
    memory.bar([i + 0.2 for i in x], peaks, width=0.4, label="measured peak", color="tab:green")
    for i, (e, p) in enumerate(zip(estimates, peaks)):
        memory.annotate(f"{(p - e) / e:+.1%}", (i + 0.2, p), textcoords="offset points", xytext=(0, 3), ha="center",
                        fontsize=8)
    memory.axhline(22, color="tab:red", linestyle=":", linewidth=1)
    memory.annotate("24 GB GPU bar: 22 GiB", (1.6, 22), textcoords="offset points", xytext=(0, 3), fontsize=8,
                    color="tab:red")
    memory.set_xticks(list(x), [n.replace(" (preset)", "") for n, _, _ in RUNS], fontsize=7)
    memory.set_ylabel("GiB (torch max_memory_allocated)")
    memory.legend(fontsize=8)
    memory.set_title("GPU memory: estimate vs peak (bar: within 3%)", fontsize=9)
    fig.tight_layout()
    out = args.record_dir / "lora-record.svg"
    fig.savefig(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
