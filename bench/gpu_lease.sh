#!/usr/bin/env bash
# The GPU bars of issues 28 and 25 in few device calls (docs/benchmarks.md, "Next lease" has the exact calls). Here,
# once:
#   bench/gpu_wheels.sh pack .gpu-wheels train eval lora ray   # train-a (21 MB), eval-a..e, lora-a (42), ray-a/b
# There, each call carries at most 64 MiB of pieces; pieces wait in $PARTS while the machine stays warm, so the
# calls follow each other at once:
#   bench/gpu_lease.sh stash   # only copy the piece(s) this call carried to $PARTS
#   bench/gpu_lease.sh train   # one H200, < 9 min: the piece, install `train`, the 7B model + data, the bench levers
#   bench/gpu_lease.sh eval    # one H100 or H200, < 9 min, once train-a and eval-a..d are stashed: eval-speed both
#                              # orders (in-process engine), the warm whole `dolly-eval run`, the host-memory refusal
#   bench/gpu_lease.sh prep    # install what is complete (train, lora), then the 7B model + data (~1.5 min)
#   bench/gpu_lease.sh lora    # one H100 (issue 25), once train, lora and ray are stashed: the 7B model + data, then
#                              # `dolly-train train --config mistral-7b-lora-1gpu` through Ray Train with its own
#                              # export (adapter + merged), the bench figure beside it, and the record
#   bench/gpu_lease.sh qlora   # the same for mistral-7b-qlora-24gb (a second call: each stays under 10 min)
#   bench/gpu_lease.sh lora-eval  # once eval is stashed too: vLLM on the merged export and on base + adapter
# Everything measured lands in $OUT as it finishes (logs, records), so a call stopped at its limit still returns
# what completed. Knobs: BENCH_VARIANTS, BENCH_STEPS, BENCH_WARMUP, BENCH_ARGS (train), EVAL_CONFIG (eval),
# LORA_STEPS (lora, qlora).
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

lora_run() {  # $1: preset, $2: run name, $3: bench variant (LORA_PRESET: another preset, e.g. cpu-tiny-lora
  set -- "${LORA_PRESET:-$1}" "$2" "$3"         # for the CPU dry run with ARCH=tiny SKIP_INSTALL=1 BENCH_ARGS=--cpu)
  lease_install
  local M=$W/models/${ARCH:-mistral-7b} D=$W/data/dolly-synthetic log="$OUT/$2-lease.log"
  if [ -f "$M/config.json" ] && [ -f "$D/manifest.json" ]; then echo "model and data from an earlier call" >"$log"
  else bench/gpu_pipeline.sh model data 2>&1 | tee "$log"; fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$log" || true
  # the preset through Ray Train (one GPU worker), exporting itself as a user's run does; with LORA_BENCH=1 the
  # same preset in bench/train_throughput.py (no Ray) too, for the record's comparison
  PRESET=$1 RUN=$2 STEPS=${LORA_STEPS:-16} EVERY=8 SAVE_OPTIMIZER_STATE=true EXTRA="checkpoint.export=true ${LORA_EXTRA:-}" \
    bench/gpu_pipeline.sh train export 2>&1 | tee -a "$log"
  if [ -n "${LORA_BENCH:-}" ]; then  # off by default: run10 holds these presets' bench figures; ~90 s more
    BENCH_VARIANTS=$3 BENCH_STEPS=${BENCH_STEPS:-6} BENCH_WARMUP=${BENCH_WARMUP:-3} \
      BENCH_ARGS=${BENCH_ARGS:---timeout 200} RUN=$2 bench/gpu_pipeline.sh bench 2>&1 | tail -n 4 | tee -a "$log"
  fi
  PRESET=$1 RUN=$2 RECORD_VARIANT=$3 bench/gpu_pipeline.sh record 2>&1 | tail -n 60 | tee -a "$log"
}

lora_eval() {
  lease_install
  local log="$OUT/lora-eval-lease.log"
  PRESET=${LORA_PRESET:-mistral-7b-lora-1gpu} RUN=lora-1gpu bench/gpu_pipeline.sh eval-lora 2>&1 | grep -v WARNING | tail -n 40 | tee "$log"
  PRESET=${LORA_PRESET:-mistral-7b-lora-1gpu} RUN=lora-1gpu RECORD_VARIANT=lora-1gpu bench/gpu_pipeline.sh record 2>&1 | tail -n 60 | tee -a "$log"
}

case "${1:-}" in
  stash) lease_stash ;;
  train) train ;;
  eval) eval_bars ;;
  prep) lease_install; bench/gpu_pipeline.sh model data 2>&1 | tee "$OUT/prep-lease.log" ;;
  lora) lora_run mistral-7b-lora-1gpu lora-1gpu lora-1gpu ;;
  qlora) lora_run mistral-7b-qlora-24gb qlora-24gb qlora-24gb ;;
  lora-eval) lora_eval ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
