#!/usr/bin/env bash
# Bring the Python packages the GPU image lacks (vLLM 0.25.0 and what it needs beyond the image, Ray, DeepSpeed,
# datasets, mistral-common, rouge-score, sentencex) to a machine that cannot reach a package index, through a
# transfer limit of 64 MiB per call:
#
#   bench/gpu_wheels.sh pack DIR          # here, with pip access: DIR/a, DIR/b, ...: one piece of one tar each
#   bench/gpu_wheels.sh stash PIECE_DIR   # there, once per transfer: copy the piece to $PARTS (default /root/parts)
#   source bench/gpu_wheels.sh install    # there, after the last piece: join, check sha256, pip install --target
#
# `pack` resolves the requirements against the packages the GPU image already has (IMAGE_PACKAGES, a file of
# names separated by ", " - the list in the device notes) and leaves out vLLM's optional GPU kernel wheels that
# its offline `LLM.generate` on a Mistral model does not import (FlashInfer, CUTLASS DSL, TileLang, ...).
set -euo pipefail
PARTS=${PARTS:-/root/parts}
SITE=${SITE:-/root/site}
PIECE=${PIECE:-63000000}   # bytes: one piece plus the checkout stays under 64 MiB

pack() {
  local dir=$1 tmp; tmp=$(mktemp -d)
  local resolve; resolve="$(dirname "${BASH_SOURCE[0]}")/gpu_wheels_resolve.py"
  mapfile -t wanted < <(python3 "$resolve" --pins vllm ray datasets mistral-common sentencex)
  mapfile -t built < <(python3 "$resolve" --pins deepspeed rouge-score)
  # tensorboardX: Ray Train's; hjson: DeepSpeed's (built below with --no-deps); gguf, importlib-metadata: vLLM's
  python3 "$resolve" "$tmp/w" "${IMAGE_PACKAGES:?}" "${wanted[@]}" tensorboardX hjson gguf importlib-metadata
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps "${built[@]}" -w "$tmp/w"
  tar -cf "$tmp/bundle.tar" -C "$tmp/w" .
  mkdir -p "$dir" && (cd "$tmp" && sha256sum bundle.tar | cut -d' ' -f1 > "$dir/bundle.sha256")
  split -b "$PIECE" -a 1 "$tmp/bundle.tar" "$tmp/piece."
  for p in "$tmp"/piece.*; do mkdir -p "$dir/${p##*.}" && mv "$p" "$dir/${p##*.}/"; done
  mv "$dir/bundle.sha256" "$dir/a/"
  rm -rf "$tmp"; ls -l "$dir"/*
}

stash() { mkdir -p "$PARTS" && cp "$1"/* "$PARTS/" && ls -l "$PARTS"; }

install() {
  if [ ! -f "$SITE/.installed" ]; then
    cat "$PARTS"/piece.* > "$PARTS/bundle.tar"
    echo "$(cat "$PARTS/bundle.sha256")  $PARTS/bundle.tar" | sha256sum -c -
    mkdir -p "$PARTS/w" && tar -xf "$PARTS/bundle.tar" -C "$PARTS/w"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$PARTS"/w/*.whl
    touch "$SITE/.installed"
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_USE_FLASHINFER_SAMPLER=0
}

case "${1:-}" in
  pack) pack "${2:?DIR}" ;;
  stash) stash "${2:?PIECE_DIR}" ;;
  install) install ;;
  *) sed -n '2,12p' "${BASH_SOURCE[0]}"; false ;;
esac
