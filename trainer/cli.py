"""`dolly-train`: one entry point, one subcommand per stage.

    dolly-train init-tiny-model --out models/tiny
    dolly-train init-model --arch mistral-7b --out models/mistral-7b-random     (GPU runs without the real weights)
    dolly-train prepare --source synthetic --tokenizer models/tiny --max-length 512 --out data/synthetic
    dolly-train data-stats --data data/synthetic
    dolly-train train --config cpu-tiny model.path=models/tiny data.path=data/synthetic
    dolly-train export --checkpoint RUN_DIR/checkpoint_... --out export/
    dolly-train submit|status|wait|logs|suspend|resume|delete ...   (RayJobs on Kubernetes)

Each subcommand lives in its own module, which exposes `add_parser(subparsers)`; modules are imported
lazily so `dolly-train prepare` never pays for importing Ray or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines add_parser(subparsers) registering it (and its `func`)
SUBCOMMANDS = {
    "init-tiny-model": "trainer.tiny_model_cli",
    "init-model": "trainer.tiny_model_cli",
    "prepare": "trainer.data.prepare",
    "data-stats": "trainer.data.stats",
    "train": "trainer.launch",
    "render-deepspeed": "trainer.launch",
    "export": "trainer.export",
    "submit": "trainer.deploy.cli",
    "status": "trainer.deploy.cli",
    "wait": "trainer.deploy.cli",
    "logs": "trainer.deploy.cli",
    "suspend": "trainer.deploy.cli",
    "resume": "trainer.deploy.cli",
    "delete": "trainer.deploy.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dolly-train",
        description="Fine-tune Mistral-7B-Instruct on Dolly-15k (Ray Train + DeepSpeed ZeRO).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    seen = set()
    for name, module in SUBCOMMANDS.items():
        if only and name != only:
            continue
        if module in seen:
            continue
        seen.add(module)
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:  # an optional extra not installed: say which
            if e.name and e.name.split(".")[0] in ("trainer",):
                raise
            sub.add_parser(name, help=f"(unavailable: {e.name} is not installed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only import the module the chosen subcommand needs.
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only).parse_args(argv)
    if not hasattr(args, "func"):
        print(f"dolly-train {args.command}: needs an optional dependency that is not installed", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
