"""`dolly-train init-tiny-model --out DIR`."""

from __future__ import annotations

import argparse

from trainer.tiny_model import TINY_MISTRAL, init_tiny_model, parameter_count


def add_parser(sub) -> None:
    p = sub.add_parser(
        "init-tiny-model",
        help="write the embedded default model (tiny Mistral + real v3 tokenizer)",
        description=(
            "Write a small Mistral-architecture model (random init, head_dim 64) with the real Mistral v3 "
            "tokenizer from mistral-common, as a Hugging Face folder loadable offline by transformers and vLLM."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random init")
    p.set_defaults(func=run)


def run(args) -> int:
    out = init_tiny_model(args.out, seed=args.seed)
    print(f"wrote {out} ({parameter_count(TINY_MISTRAL) / 1e6:.1f}M parameters, Mistral v3 tokenizer)")
    return 0
