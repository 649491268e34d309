"""Writing a run's or a compare's folder: atomic folder replacement, JSON/JSONL, charts, Markdown + HTML.

A report is a list of blocks (heading, paragraph, table, image, example) rendered twice, once as Markdown
and once as a standalone HTML page, so the two never drift apart.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from evaluator.config import EvalInputError
from evaluator.score import ROUGE_TYPES
from trainer.atomic import atomic_dir  # noqa: F401  (re-exported: run.py and compare.py write through it)

# ---- atomic output folders -----------------------------------------------------------------------


def check_out_dir(out: str | Path) -> Path:
    p = Path(out).resolve()
    if p.exists() and not p.is_dir():
        raise EvalInputError(f"--out {out}: exists and is not a directory")
    return p


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return rows


# ---- charts ----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines or in the eval Job
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, groups: list[str], series: dict[str, list[tuple[float, float, float]]],
              title: str, ylabel: str) -> None:
    """Grouped bars with CI error bars; series maps a label to (mean, ci_low, ci_high) per group.

    The figure is as wide as its groups need (0.8 in each, 6-10 in at 100 dpi: at most 1,000 px, inside the HTML
    page's 1,100 px column) and is saved cropped to what it draws, so nothing (a rotated category name, the
    legend) is cut off; the HTML scales it down on narrower pages (PAGE_CSS)."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(10.0, max(6.0, 0.8 * len(groups) + 2.5)), 4.2))
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for k, (label, vals) in enumerate(series.items()):
        means = np.array([v[0] for v in vals])
        err = np.array([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]])
        ax.bar(x + (k - (len(series) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=label)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title, pad=22)
    # Between the title and the plot, outside the bars: inside it hid the tallest ones.
    ax.legend(fontsize=8, ncols=len(series), loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


# ---- blocks -> Markdown / HTML ---------------------------------------------------------------------


def fmt_ci(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *a in blocks:
        if kind == "h":
            out.append(f"{'#' * a[0]} {a[1]}\n")
        elif kind == "p":  # ("p", text) or ("p", text, "strong"): the page's headline
            out.append(f"**{a[0]}**\n" if a[1:] == ["strong"] else f"{a[0]}\n")
        elif kind == "table":
            header, rows = a
            out.append("| " + " | ".join(map(_md_cell, header)) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            out.append(f"![{a[1]}]({a[0]})\n")
        elif kind == "example":
            title, fields = a
            out.append(f"**{title}**\n")
            for name, text in fields:
                quoted = "\n".join("> " + line for line in str(text).splitlines() or [""])
                out.append(f"*{name}*\n\n{quoted}\n")
    return "\n".join(out).rstrip() + "\n"


# Every part fits the page's width (checked in a browser at 1280 and 800 px: tests/test_report_layout.py): images
# scale down to the column, long unbroken text (paths, hashes, JSON) wraps anywhere, and a table wider than a
# narrow screen scrolls inside its own box instead of widening the page.
PAGE_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;overflow-wrap:anywhere}"
            "img{max-width:100%;height:auto;display:block}"
            ".wide{max-width:100%;overflow-x:auto}"
            "table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;overflow-wrap:normal}"
            "td:first-child,th:first-child{text-align:left}"
            "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}")


def to_html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
           "<meta name='viewport' content='width=device-width, initial-scale=1'><style>" + PAGE_CSS +
           "</style></head><body>"]
    for kind, *a in blocks:
        if kind == "h":
            out.append(f"<h{a[0]}>{e(a[1])}</h{a[0]}>")
        elif kind == "p":
            out.append(f"<p><strong>{e(a[0])}</strong></p>" if a[1:] == ["strong"] else f"<p>{e(a[0])}</p>")
        elif kind == "table":
            header, rows = a
            out.append("<div class='wide'><table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table></div>")
        elif kind == "img":
            out.append(f"<img src='{e(a[0])}' alt='{e(a[1])}'>")
        elif kind == "example":
            out.append(f"<h4>{e(a[0])}</h4>")
            out += [f"<p><i>{e(n)}</i></p><pre>{e(str(t))}</pre>" for n, t in a[1]]
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(folder: Path, stem: str, blocks: list[tuple], title: str) -> None:
    (folder / f"{stem}.md").write_text(to_markdown(blocks))
    (folder / f"{stem}.html").write_text(to_html(blocks, title))


# ---- the run report ----------------------------------------------------------------------------------

EXAMPLES_SHOWN = 3
PROMPT_CHARS = 600


def _example_blocks(rows: list[dict], label: str) -> list[tuple]:
    blocks = []
    for r in rows:
        prompt = r["prompt"] if len(r["prompt"]) <= PROMPT_CHARS else r["prompt"][:PROMPT_CHARS] + " ..."
        title = f"{label}: {r['id']} ({r['category']}), ROUGE-L F1 {r['scores']['rougeL']['f1']:.3f}"
        blocks.append(("example", title, [("prompt", prompt), ("reference", r["reference"]),
                                          ("prediction", r["prediction"] or "(empty)")]))
    return blocks


def run_blocks(metrics: dict, rows: list[dict], chart: str) -> list[tuple]:
    o, g = metrics["overall"], metrics["generation"]
    blocks: list[tuple] = [
        ("h", 1, "dolly-eval run"),
        ("p", f"Model {metrics['model']['path']} (weights sha256 {metrics['model']['weights_sha256'][:12]}), "
              f"test split {metrics['data']['test_file']} (sha256 {metrics['data']['test_sha256'][:12]}), "
              f"{metrics['num_examples']} examples, sampling {json.dumps(metrics['sampling'])}, "
              f"vLLM {metrics['engine']['vllm_version']} on {metrics['engine']['device']}."),
        ("h", 2, f"Overall (mean [{metrics['scoring']['confidence']:.0%} bootstrap CI])"),
        ("table", ["metric", "F1", "precision", "recall"],
         [[t, fmt_ci(o[t]["f1"]), fmt_ci(o[t]["precision"]), fmt_ci(o[t]["recall"])] for t in ROUGE_TYPES]),
        ("h", 2, "By category (F1)"),
        ("table", ["category", "n", *ROUGE_TYPES],
         [[c, s["rougeL"]["f1"]["n"], *[fmt_ci(s[t]["f1"], 3) for t in ROUGE_TYPES]]
          for c, s in metrics["by_category"].items()]),
        ("img", chart, "F1 by category"),
        ("p", f"ROUGE as rouge-score computes it (stemming on). rougeLsum is scored one sentence per line "
              f"({metrics['scoring'].get('rougeLsum', 'newline-separated')}); rougeL ignores line breaks."),
        ("p", _truncation_note(metrics["data"])),
        ("h", 2, "Generation"),
        ("table", ["quantity", "value"], [
            ["finish reasons", json.dumps(g["finish_reasons"])],
            ["empty predictions", g["empty_predictions"]],
            ["truncated (hit max_new_tokens / max_model_len)", g["truncated"]],
            ["prompt tokens mean / p50 / p90 / max", _stats(g["prompt_tokens"])],
            ["output tokens mean / p50 / p90 / max", _stats(g["output_tokens"])],
            ["prompts/s", f"{g['throughput']['prompts_per_s']:.2f}"],
            ["generated tokens/s", f"{g['throughput']['generated_tokens_per_s']:.1f}"],
            ["engine start s / generate s",
             f"{g['throughput']['engine_start_seconds']:.1f} / {g['throughput']['generate_seconds']:.2f}"],
        ]),
    ]
    if "timings" in metrics:
        blocks += timing_blocks(metrics)
    if "protocol" in metrics:
        blocks.insert(2, ("p", metrics["protocol"]["statement"]))
    ranked = sorted(rows, key=lambda r: (r["scores"]["rougeL"]["f1"], r["id"]))
    blocks += [("h", 2, "Best examples (ROUGE-L F1)")] + _example_blocks(ranked[::-1][:EXAMPLES_SHOWN], "best")
    blocks += [("h", 2, "Worst examples (ROUGE-L F1)")] + _example_blocks(ranked[:EXAMPLES_SHOWN], "worst")
    return blocks


PHASES = (("inputs_seconds", "input checks + prompt ids"), ("vllm_import_seconds", "import vLLM"),
          ("hash_seconds", "weight hashing (background, beside the engine start)"),
          ("engine_start_seconds", "engine start"),
          ("background_wait_seconds", "waited for background work after the engine start"),
          ("generate_seconds", "generate"), ("score_seconds", "ROUGE scoring + statistics"),
          ("report_seconds", "predictions + chart"), ("total_seconds", "total (this run, before the report pages)"))


def timing_blocks(metrics: dict) -> list[tuple]:
    t, cache = metrics["timings"], metrics["engine"].get("cache") or {}
    note = (f"Scoring ran in {t['scoring_workers']} process(es); weight hashing, matplotlib's import and the "
            f"scoring workers' start ran beside the engine start. vLLM cache {cache.get('root', '?')}: torch.compile cache "
            f"{cache.get('torch_compile_cache', '?')} at engine start.")
    return [("h", 2, "Time by phase"),
            ("table", ["phase", "seconds"], [[label, f"{t[k]:.2f}"] for k, label in PHASES if k in t]),
            ("p", note)]


def _truncation_note(data: dict) -> str:
    cut = data.get("prompts_truncated") or {}
    over = data.get("manifest_test_longer_than_max_length")
    split = ("" if over is None else
             f"The test split was made before prepare's {data.get('manifest_max_length')}-token training cap, so it "
             f"keeps its {over} example(s) longer than that. ")
    if not cut.get("count"):
        return split + "Every test prompt was used whole (none longer than max_model_len - max_new_tokens)."
    return split + (f"{cut['count']} test prompt(s) were longer than {cut['max_prompt_tokens']} tokens (max_model_len - "
            f"max_new_tokens): their context passage was cut to fit, the instruction kept whole; they stay in the "
            f"test set (listed in metrics.json data.prompts_truncated).")


def _stats(s: dict) -> str:
    return f"{s['mean']:.1f} / {s['p50']:.0f} / {s['p90']:.0f} / {s['max']}"


def run_chart(path: Path, metrics: dict) -> None:
    cats = ["overall", *metrics["by_category"]]
    per = {"overall": metrics["overall"], **metrics["by_category"]}
    series = {t: [(per[c][t]["f1"]["mean"], per[c][t]["f1"]["ci_low"], per[c][t]["f1"]["ci_high"]) for c in cats]
              for t in ROUGE_TYPES}
    conf = metrics["scoring"]["confidence"]
    bar_chart(path, cats, series, f"ROUGE F1 by Dolly category ({conf:.0%} bootstrap CI)", "F1")
