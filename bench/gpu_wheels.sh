#!/usr/bin/env bash
# Bring the Python packages the GPU image lacks to a machine that cannot reach a package index, by purpose, through
# a transfer limit of 64 MiB per call:
#
#   bench/gpu_wheels.sh pack DIR [PURPOSE...]  # here, with pip access: DIR/<purpose>-a, -b, ...: one piece each
#   bench/gpu_wheels.sh check DIR              # here: re-check the bundles `pack` left in DIR/bundles
#   bench/gpu_wheels.sh stash PIECE_DIR        # there, once per transfer: copy the piece to $PARTS (/root/parts)
#   source bench/gpu_wheels.sh install         # there, after the last piece: join, sha256, pip install --target
#
# Purposes (bench/gpu_wheels_resolve.py PURPOSES; default all four), with the pieces they took on 2026-12-06:
#   train  DeepSpeed (pure Python), datasets, mistral-common + what they need   bench/train_throughput.py, init-model,
#          (1 piece)                                                              prepare, export
#   ray    Ray 2.60.0 with the train extra (2 pieces)                             dolly-train train (Ray Train)
#   eval   vLLM 0.25.0, rouge-score + nltk, sentencex, ... (5 pieces)             dolly-eval, bench/eval_speed.py
#   lora   bitsandbytes (1 piece; peft is in the image)                           LoRA / QLoRA training
# `pack` resolves each purpose against the GPU image's packages (IMAGE_PACKAGES, default
# bench/gpu_image_packages.txt) and then proves each bundle: every wheel's Requires-Dist (markers for CPython 3.12
# on x86-64 Linux, the extras used) met by the bundle or the image, else it fails naming the wheel and the
# requirement. `install` installs every purpose whose pieces are all in $PARTS, each into $SITE/<purpose>
# (separate targets: pip --target replaces a shared bin/ folder wholesale), so pieces of a later call add to it.
set -euo pipefail
PARTS=${PARTS:-/root/parts}
SITE=${SITE:-/root/site}
PIECE=${PIECE:-63000000}   # bytes: one piece plus the checkout stays under 64 MiB
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

pack() {
  local dir=$1; shift
  local purposes=("$@"); [ ${#purposes[@]} -gt 0 ] || purposes=(train ray eval lora)
  local image=${IMAGE_PACKAGES:-$HERE/gpu_image_packages.txt}
  mkdir -p "$dir"
  # the cache keeps downloads between pack runs; bundles/<purpose> is what travels, checked before it is split
  python3 "$HERE/gpu_wheels_resolve.py" fetch "$dir/cache" "$dir/bundles" "$image" "${purposes[@]}"
  local p tmp; tmp=$(mktemp -d)
  for p in "${purposes[@]}"; do
    rm -rf "${dir:?}/$p"-?
    tar -cf "$tmp/$p.tar" -C "$dir/bundles/$p" .
    split -b "$PIECE" -a 1 "$tmp/$p.tar" "$tmp/piece.$p."
    local first=""
    for f in "$tmp/piece.$p".*; do
      local piece="$dir/$p-${f##*.}"; mkdir -p "$piece" && mv "$f" "$piece/"; first=${first:-$piece}
    done
    (cd "$tmp" && sha256sum "$p.tar" | cut -d' ' -f1) > "$first/$p.sha256"
    find "$dir" -path "$dir/$p-?/piece.$p.*" | wc -l > "$first/$p.pieces"
  done
  rm -rf "$tmp"
  du -sh "$dir"/*-? | sed 's/^/  /'
}

check() {
  local p; for p in "$1"/bundles/*/; do
    python3 "$HERE/gpu_wheels_resolve.py" check "$p" "${IMAGE_PACKAGES:-$HERE/gpu_image_packages.txt}" "$(basename "$p")"
  done
}

stash() { mkdir -p "$PARTS" && cp "$1"/* "$PARTS/" && ls -l "$PARTS"; }

install() {
  local sha p n
  for sha in "$PARTS"/*.sha256; do
    [ -e "$sha" ] || { echo "gpu_wheels: no pieces in $PARTS" >&2; return 1; }
    p=$(basename "$sha" .sha256)
    if [ ! -f "$SITE/$p/.installed" ]; then
      n=$(find "$PARTS" -maxdepth 1 -name "piece.$p.*" | wc -l)
      if [ "$n" -ne "$(cat "$PARTS/$p.pieces")" ]; then
        echo "gpu_wheels: $p has $n of $(cat "$PARTS/$p.pieces") pieces in $PARTS: not installed yet" >&2; continue
      fi
      cat "$PARTS/piece.$p".* > "$PARTS/$p.tar"
      echo "$(cat "$sha")  $PARTS/$p.tar" | sha256sum -c - >/dev/null
      rm -rf "${PARTS:?}/w-$p" && mkdir -p "$PARTS/w-$p" && tar -xf "$PARTS/$p.tar" -C "$PARTS/w-$p"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/$p" "$PARTS/w-$p"/*.whl
      rm -f "$PARTS/$p.tar" && touch "$SITE/$p/.installed"
    fi
    case ":${PYTHONPATH:-}:" in *":$SITE/$p:"*) ;; *) export PYTHONPATH=$SITE/$p${PYTHONPATH:+:$PYTHONPATH} ;; esac
    [ ! -d "$SITE/$p/bin" ] || export PATH=$SITE/$p/bin:$PATH
    echo "gpu_wheels: $p installed in $SITE/$p" >&2
  done
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_USE_FLASHINFER_SAMPLER=0
}

case "${1:-}" in
  pack) shift; pack "${1:?DIR}" "${@:2}" ;;
  check) check "${2:?DIR}" ;;
  stash) stash "${2:?PIECE_DIR}" ;;
  install) install ;;
  *) sed -n '2,22p' "${BASH_SOURCE[0]}"; false ;;
esac
