"""`dolly-train init-tiny-model --out DIR` and `dolly-train init-model --arch mistral-7b --out DIR`."""

from __future__ import annotations

import argparse

from trainer.tiny_model import ARCHITECTURES, TINY_MISTRAL, init_model, init_tiny_model, parameter_count


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

    m = sub.add_parser(
        "init-model",
        help="write a random-init model folder of a given architecture (e.g. Mistral-7B's, for GPU runs)",
        description=(
            "Write a random-init Mistral-architecture model with the real Mistral v3 tokenizer, as a Hugging Face "
            "folder (safetensors) that `dolly-train train` and vLLM load offline. `mistral-7b` is "
            "Mistral-7B-Instruct-v0.3's config field for field (7.25B parameters, 14.5 GB in bf16): what a run "
            "or a benchmark needs where the real weights cannot be downloaded."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny", help="architecture")
    m.add_argument("--out", required=True, help="output folder (replaced atomically)")
    m.add_argument("--layers", type=int, help="number of decoder layers (default: the architecture's)")
    m.add_argument("--dtype", choices=("bfloat16", "float32"), help="weights dtype (default: fp32 tiny, bf16 else)")
    m.add_argument("--device", help="where to initialise (default: cuda when present for large models, else cpu)")
    m.add_argument("--seed", type=int, default=0, help="seed for the random init")
    m.set_defaults(func=run_init_model)


def run(args) -> int:
    import os

    # transformers' save_pretrained imports DeepSpeed, which warns that it found no GPU ("Setting accelerator to
    # CPU"), and draws a progress bar for one 21 MB file: a CPU model written on the CPU needs neither line.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = init_tiny_model(args.out, seed=args.seed)
    print(f"wrote {out} ({parameter_count(TINY_MISTRAL) / 1e6:.1f}M parameters, Mistral v3 tokenizer)")
    return 0


def run_init_model(args) -> int:
    fields = dict(ARCHITECTURES[args.arch])
    if args.layers is not None:
        if args.layers < 1:
            print(f"dolly-train init-model: --layers must be at least 1, got {args.layers}")
            return 2
        fields["num_hidden_layers"] = args.layers
    out = init_model(args.out, arch=args.arch, seed=args.seed, layers=args.layers, dtype=args.dtype,
                     device=args.device)
    print(f"wrote {out} ({parameter_count(fields) / 1e9:.3f}B parameters, {args.arch}, Mistral v3 tokenizer)")
    return 0
