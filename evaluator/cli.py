"""`dolly-eval`: vLLM batch generation on the held-out Dolly split, scored with ROUGE.

    dolly-eval run --model DIR [--adapter PEFT_DIR] --data DIR --out DIR [--config FILE] [engine/sampling/scoring options] [--verbose]
    dolly-eval compare BASE_DIR TUNED_DIR --out DIR [--brief]
    dolly-eval wait-export --model RUN_DIR/export [--adapter RUN_DIR/export-adapter] [--run-dir RUN_DIR] [--timeout S]
                                                                                        (the eval Job's first step)

`run` is quiet: its own lines on the terminal, vLLM's and the libraries' in <out>/eval.log (evaluator/console.py).

Bad input (missing or mismatched model, malformed test split, runs that cannot be compared) is reported in
one line naming the file/line/field and exits with status 2, before vLLM starts and without writing --out.
"""

from __future__ import annotations

import argparse
import logging
import sys

from evaluator.config import EvalInputError, add_run_arguments, from_args, scoring_from_args
from trainer.log import configure


def _run(args) -> int:
    from evaluator.console import quiet_run
    from evaluator.run import run, summary_table

    cfg = from_args(args)
    if args.verbose:
        metrics = run(cfg)
    else:  # vLLM's and the libraries' output to <out>/eval.log, our lines to the terminal (evaluator/console.py)
        with quiet_run(cfg.out) as quiet:
            metrics = run(cfg, quiet=quiet)
    print(summary_table(metrics))
    return 0


def _compare(args) -> int:
    from evaluator.compare import compare, format_table

    print(format_table(compare(args.base, args.tuned, args.out, scoring_from_args(args)), brief=args.brief))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dolly-eval", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="generate on the test split with vLLM and score with ROUGE",
                       description="Generate on DIR/test.jsonl with vLLM (prompt ids from trainer.prompt) and "
                                   "score with ROUGE. Writes predictions.jsonl, metrics.json, report.md/.html.")
    add_run_arguments(p)
    p.add_argument("--verbose", action="store_true",
                   help="print vLLM's and the libraries' output too (default: only dolly-eval's lines; the rest "
                        "goes to <out>/eval.log, named when the run ends)")
    p.set_defaults(func=_run)

    c = sub.add_parser("compare", help="paired bootstrap deltas between two runs",
                       description="Per-metric F1 deltas (tuned - base) with paired bootstrap CIs and p-values, "
                                   "overall and per category, under a one-sentence headline. Refuses runs on "
                                   "different test splits, sampling or max_model_len.")
    c.add_argument("base", metavar="BASE_DIR", help="output folder of `dolly-eval run` for the base model")
    c.add_argument("tuned", metavar="TUNED_DIR", help="output folder of `dolly-eval run` for the tuned model")
    c.add_argument("--out", required=True, help="output folder: compare.json, compare.md, compare.html, compare.png")
    c.add_argument("--brief", action="store_true",
                   help="print the headline and the overall rows only (the files keep every category)")
    add_run_arguments(c, groups=("scoring",))
    c.set_defaults(func=_compare)

    from evaluator import wait

    wait.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)  # libraries
    configure("dolly-eval", "[dolly-eval]", stderr_from=logging.DEBUG)  # ours: trainer/log.py's format, on stderr
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EvalInputError as e:
        print(f"dolly-eval {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # vLLM starts its engine in a child process that re-imports this module
    sys.exit(main())
