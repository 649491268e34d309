#!/usr/bin/env bash
# Issue 28's GPU bars in few device calls (docs/benchmarks.md, "Next lease" has the exact calls). Here, once:
#   bench/gpu_wheels.sh pack .gpu-wheels train eval     # .gpu-wheels/train-a (21 MB), eval-a .. eval-e (5 x <= 61 MB)
# There, each call carries at most one piece (64 MiB per call); pieces wait in $PARTS while the machine stays warm
# (it goes back 30 s after a call), so the calls follow each other at once:
#   bench/gpu_lease.sh stash   # only copy the piece(s) this call carried to $PARTS
#   bench/gpu_lease.sh train   # one H200, < 9 min: the piece, install `train`, the 7B model + data, the bench levers
#   bench/gpu_lease.sh eval    # one H100 or H200, < 9 min, once train-a and eval-a..d are stashed: eval-speed both
#                              # orders (in-process engine), the warm whole `dolly-eval run`, the host-memory refusal
# Everything measured lands in $OUT as it finishes (logs, records), so a call stopped at its limit still returns
# what completed. Knobs: BENCH_VARIANTS, BENCH_STEPS, BENCH_WARMUP, BENCH_ARGS (train), EVAL_CONFIG (eval).
set -euo pipefail
cd "$(dirname "$0")/.."
PIECES=${PIECES:-.gpu-wheels}
W=${DOLLY_GPU_WORK:-/root/dolly-gpu}
OUT=${OUT:?run on the device machine: results go to \$OUT}
export DOLLY_GPU_WORK=$W PYTHONUNBUFFERED=1

lease_stash() {
  local d
  for d in "$PIECES"/*-?; do [ ! -d "$d" ] || bash bench/gpu_wheels.sh stash "$d" >/dev/null; done
  ls "${PARTS:-/root/parts}"
}

lease_install() {
  if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: the packages are there already (a CPU dry run)
    lease_stash
    # shellcheck source=bench/gpu_wheels.sh
    source bench/gpu_wheels.sh install
  fi
  python3 - <<'PY' 2>&1 | tee "$OUT/imports.txt"
import importlib, importlib.metadata as md


def _has(dist):
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False

for mod, dist in [("deepspeed", "deepspeed"), ("datasets", "datasets"), ("mistral_common", "mistral-common"),
                  ("vllm.entrypoints.llm", "vllm"), ("xgrammar", "xgrammar"), ("rouge_score.rouge_scorer", "rouge-score"),
                  ("nltk", "nltk"), ("sentencex", "sentencex")]:
    try:
        importlib.import_module(mod)
    except ImportError as e:  # a purpose not carried in this lease, or a broken bundle: said, not fatal here
        print(f"import {mod}: FAILED {type(e).__name__}: {e}")
        continue
    found = [f"{d} {md.version(d)}" for d in (dist, dist + "-cpu") if _has(d)]
    print(f"import {mod}: ok ({', '.join(found)})")
PY
}

train() {
  lease_install
  export BENCH_VARIANTS=${BENCH_VARIANTS:-preset-1gpu,1gpu-persist,1gpu-persist-sac-k26,1gpu-compile}
  export BENCH_STEPS=${BENCH_STEPS:-6} BENCH_WARMUP=${BENCH_WARMUP:-4} BENCH_ARGS=${BENCH_ARGS:---timeout 200}
  bench/gpu_pipeline.sh model data bench 2>&1 | tee "$OUT/train-lease.log"
}

eval_bars() {
  lease_install
  local M=$W/models/${ARCH:-mistral-7b} D=$W/data/dolly-synthetic C=${EVAL_CONFIG:-evaluator/configs/mistral-7b-h200.yaml}
  if [ -f "$M/config.json" ] && [ -f "$D/manifest.json" ]; then echo "model and data from an earlier call" >"$OUT/eval-lease.log"
  else bench/gpu_pipeline.sh model data 2>&1 | tee "$OUT/eval-lease.log"; fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/eval-lease.log" || true
  # raw vLLM vs the evaluator on one in-process engine, both orders, prefix cache reset before each pass; the cold
  # compile cache first, then the whole command warm in a child (which needs the engine's memory back)
  python3 bench/eval_speed.py --model "$M" --data "$D" --config "$C" --cache-root "$W/vllm-cache" --fresh-cache \
    --work-dir "$W/eval-speed" --json-out "$OUT/eval-speed.json" --in-process 2>&1 | grep -v WARNING \
    | tee -a "$OUT/eval-lease.log" || echo "eval_speed.py failed (see above)" | tee -a "$OUT/eval-lease.log"
  # the whole command warm, engine in vLLM's own processes (the GPU default)
  local t0; t0=$(date +%s%N)
  VLLM_CACHE_ROOT=$W/vllm-cache python3 -m evaluator.cli run --config "$C" --model "$M" --data "$D" \
    --out "$W/eval-warm" --no-in-process 2>&1 | grep -v WARNING | tail -n 5 | tee -a "$OUT/eval-lease.log"
  echo "whole dolly-eval run, warm, vLLM's processes: $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/eval-lease.log"
  cp "$W/eval-warm/metrics.json" "$OUT/eval-warm-metrics.json"
  # the 7B ZeRO-2 + optimizer offload run that this host killed: refused in preflight now, naming the knobs
  timeout 120 python3 bench/train_throughput.py --model "$M" --variants z2-offload-packed-flex --steps 1 --warmup 1 \
    --timeout 100 --out "$OUT" 2>&1 | grep -E "z2-offload|host memory|ResourcePreflight" | head -n 5 \
    | tee -a "$OUT/eval-lease.log" || true
}

case "${1:-}" in
  stash) lease_stash ;;
  train) train ;;
  eval) eval_bars ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
