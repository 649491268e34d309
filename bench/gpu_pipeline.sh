#!/usr/bin/env bash
# The product's own job on one GPU, through its own commands, stage by stage:
#
#   bench/gpu_pipeline.sh model data bench train-kill train-resume export eval record
#
#   model         dolly-train init-model --arch mistral-7b (random init, bf16 safetensors, the real v3 tokenizer)
#   data          dolly-train prepare --source synthetic --profile dolly (15,000 records, max length 2,048)
#   bench         bench/train_throughput.py on the same model folder and data dir (no Ray), same preset
#   train         one uninterrupted `dolly-train train --config $PRESET` through Ray Train (a fresh run dir)
#   train-kill    a local Ray head started as the chart's RayJob starts one (`ray start --head`), then
#                 `dolly-train train --config $PRESET` through Ray Train (one GPU worker, NCCL); killed once
#                 Ray Train has registered its second checkpoint
#   train-resume  the same command again: it resumes from the latest checkpoint and finishes
#   export        `dolly-train export` of the final checkpoint (the run's own export too, when enabled)
#   eval          `dolly-eval run` on the base folder and on the export, then `dolly-eval compare` (needs vLLM)
#   eval-lora     LoRA runs: `dolly-eval run` on the merged export and on base + adapter (vLLM's LoRA path),
#                 one seed each, then `dolly-eval compare` of the two (needs vLLM)
#   export-train  bench/export_logits.py train: a few in-process steps, the engine's probe logits, an export
#   export-check  bench/export_logits.py check: those logits vs the export's in transformers, and vLLM's
#                 prompt log-probs of the export (needs vLLM)
#   eval-speed    bench/eval_speed.py: raw vLLM vs `dolly-eval run` on one engine, cold then warm (needs vLLM)
#   record        one JSON record of all figures (docs/benchmarks/gpu-pipeline-<date>.json shape)
#
# Stages share $DOLLY_GPU_WORK (default /root/dolly-gpu), so they can run in separate calls on one machine.
# Every knob is an environment variable (defaults: the 1-GPU preset on the 7B architecture); on a CPU the
# same script runs end to end on the tiny model (ARCH=tiny PRESET=cpu-tiny BENCH_ARGS=--cpu, small sizes):
#   ARCH=mistral-7b LAYERS= PRESET=mistral-7b-zero3-1gpu STEPS_KILL=16 STEPS=24 EVERY=8 NUM_EXAMPLES=15000
#   MAX_LENGTH=2048 BENCH_VARIANTS=preset-1gpu BENCH_STEPS=10 EXTRA="override ..." PY=python3 RAY_PORT=6379
#   RUN=gpu-pipeline (the run dir's name under $DOLLY_GPU_WORK/runs)
# A 64 GiB disk cannot hold a 7B ZeRO-3 checkpoint with optimizer state (~100 GB): by default the run writes
# weights-only checkpoints (checkpoint.save_optimizer_state=false, ~14.5 GB); SAVE_OPTIMIZER_STATE=true
# with LAYERS=8 proves the full-state resume on a same-width model that fits.
set -euo pipefail
cd "$(dirname "$0")/.."

W=${DOLLY_GPU_WORK:-/root/dolly-gpu}
ARCH=${ARCH:-mistral-7b}
LAYERS=${LAYERS:-}
PRESET=${PRESET:-mistral-7b-zero3-1gpu}
STEPS_KILL=${STEPS_KILL:-16}     # kill after the checkpoint of this step is registered
STEPS=${STEPS:-24}
EVERY=${EVERY:-8}
NUM_EXAMPLES=${NUM_EXAMPLES:-15000}
MAX_LENGTH=${MAX_LENGTH:-2048}
SAVE_OPTIMIZER_STATE=${SAVE_OPTIMIZER_STATE:-false}
BENCH_VARIANTS=${BENCH_VARIANTS:-preset-1gpu}
BENCH_STEPS=${BENCH_STEPS:-10}
BENCH_WARMUP=${BENCH_WARMUP:-3}
EVAL_CONFIG=${EVAL_CONFIG:-evaluator/configs/mistral-7b-h200.yaml}
EXTRA=${EXTRA:-}
PY=${PY:-python3}
RAY_PORT=${RAY_PORT:-6379}
OUTDIR=${OUT:-$W/out}
RUN=${RUN:-gpu-pipeline}
M=$W/models/$ARCH${LAYERS:+-l$LAYERS}
D=$W/data/dolly-synthetic
R=$W/runs
T=$W/timings/$RUN   # per run: the LoRA lease records two runs on one machine
mkdir -p "$W" "$T" "$OUTDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists (any earlier local ray.init writes one),
# and a driver without the token then cannot connect: this one-machine head runs without auth, as a kind cluster does
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# one vLLM compile cache for every engine here, as the eval Job keeps it on the volume (eval-speed empties it
# first, so its engine start is the cold figure and every later one is warm)
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$W/vllm-cache}
cli() { "$PY" -m trainer.cli "$@"; }
now() { date +%s%N; }
seconds_since() { echo $(( ($(now) - $1) / 1000000 )) | awk '{printf "%.3f\n", $1 / 1000}'; }
# timed NAME CMD...: run CMD and write its wall seconds to $T/NAME
timed() { local name=$1; shift; local t0; t0=$(now); "$@"; seconds_since "$t0" > "$T/$name"; }

export PY PRESET M D R RUN EVERY SAVE_OPTIMIZER_STATE EXTRA STEPS
train_cmd() {  # the one training command both legs run (the resume is "rerun the same command")
  # shellcheck disable=SC2086
  cli train --config "$PRESET" "model.path=$M" "data.path=$D" "checkpoint.storage_path=$R" \
    "checkpoint.run_name=$RUN" "checkpoint.every_steps=$EVERY" checkpoint.keep=1 checkpoint.max_failures=0 \
    "checkpoint.save_optimizer_state=$SAVE_OPTIMIZER_STATE" checkpoint.export=false logging.every_steps=2 \
    logging.eval_every_steps=100000 logging.eval_max_batches=4 "schedule.max_steps=$1" $EXTRA
}

ray_head() {  # what the chart's RayJob runs in the head pod, on this one machine (the GPU is local)
  if ! ray status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1; then
    ray start --head --port="$RAY_PORT" --disable-usage-stats --include-dashboard=false >"$W/ray-start.log" 2>&1
  fi
  export RAY_ADDRESS=127.0.0.1:$RAY_PORT
}

registered_checkpoint() {  # the newest checkpoint Ray Train's controller has recorded in its run snapshot
  "$PY" - "$R/$RUN" <<'PY'
import json, pathlib, re, sys
run = pathlib.Path(sys.argv[1])
snap = run / "checkpoint_manager_snapshot.json"
steps = [int(m) for m in re.findall(r"checkpoint_(\d{8})", snap.read_text())] if snap.is_file() else []
print(max(steps) if steps else 0)
PY
}

stage_model() { timed model cli init-model --arch "$ARCH" ${LAYERS:+--layers "$LAYERS"} --out "$M"; du -sb "$M" | cut -f1 > "$T/model_bytes"; }

stage_data() {
  timed data cli prepare --source synthetic --profile dolly --num-examples "$NUM_EXAMPLES" --tokenizer "$M" \
    --max-length "$MAX_LENGTH" --out "$D"
}

stage_bench() {
  # shellcheck disable=SC2086
  "$PY" bench/train_throughput.py --model "$M" --data "$D" --variants "$BENCH_VARIANTS" --steps "$BENCH_STEPS" \
    --warmup "$BENCH_WARMUP" --max-length "$MAX_LENGTH" --out "$OUTDIR" ${BENCH_ARGS:-} 2>&1 | tee "$W/bench.log" | grep -v WARNING
  find "$OUTDIR" -maxdepth 1 -name 'train_throughput_*.json' | sort | tail -n1 > "$T/bench_record"
}

stage_train_kill() {
  ray_head
  rm -rf "${R:?}/$RUN"
  local t0 log=$W/train-leg1.log; t0=$(now)
  export -f cli train_cmd
  # shellcheck disable=SC2016  # expanded by the child shell, from the exported variables
  setsid bash -c 'train_cmd "$STEPS"' >"$log" 2>&1 &
  local pid=$!
  until [ "$(registered_checkpoint)" -ge "$STEPS_KILL" ]; do
    kill -0 $pid 2>/dev/null || { tail -n 60 "$log"; echo "gpu_pipeline: leg 1 ended before step $STEPS_KILL" >&2; exit 1; }
    sleep 2
  done
  kill -KILL -- -"$pid" 2>/dev/null || true   # the whole driver process group, like a lost submitter pod
  wait $pid 2>/dev/null || true
  seconds_since "$t0" > "$T/train_leg1"
  registered_checkpoint > "$T/killed_after_checkpoint"
  grep -v WARNING "$log" | grep -E "dolly-train|Error" | tail -n 20
}

stage_train() { rm -rf "${R:?}/$RUN"; stage_train_resume; }

stage_train_resume() {
  ray_head
  local log=$W/train-leg2.log
  export -f cli train_cmd
  # shellcheck disable=SC2016  # expanded by the child shell, from the exported variables
  timed train_leg2 bash -c 'train_cmd "$STEPS"' >"$log" 2>&1 || { tail -n 80 "$log"; exit 1; }
  grep -v WARNING "$log" | grep -E "dolly-train|resumed" | tail -n 20
  cp "$R/$RUN/metrics.jsonl" "$OUTDIR/metrics.jsonl"
}

stage_export() {  # with EXTRA=checkpoint.export=true the run exported itself: only its sizes are taken here
  local last; last=$(find "$R/$RUN" -maxdepth 1 -type d -name 'checkpoint_[0-9]*' | sort | tail -n1)
  du -sb "$last" | cut -f1 > "$T/checkpoint_bytes"
  [ -f "$R/$RUN/export/config.json" ] || timed export cli export --checkpoint "$last" --out "$R/$RUN/export"
  du -sb "$R/$RUN/export" | cut -f1 > "$T/export_bytes"
  if [ -d "$R/$RUN/export-adapter" ]; then  # LoRA: the PEFT adapter beside the merged folder
    du -sb "$R/$RUN/export-adapter" | cut -f1 > "$T/adapter_bytes"
    cp "$R/$RUN"/export*/lora_export.json "$OUTDIR/$RUN-lora_export.json" 2>/dev/null || true
  fi
}

stage_eval() {
  export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
  timed eval_base "$PY" -m evaluator.cli run --config "$EVAL_CONFIG" --model "$M" --data "$D" --out "$R/$RUN/eval/base"
  timed eval_tuned "$PY" -m evaluator.cli run --config "$EVAL_CONFIG" --model "$R/$RUN/export" --data "$D" \
    --out "$R/$RUN/eval/tuned"
  "$PY" -m evaluator.cli compare "$R/$RUN/eval/base" "$R/$RUN/eval/tuned" --out "$R/$RUN/eval/compare"
  cp "$R/$RUN/eval/tuned/metrics.json" "$OUTDIR/eval-tuned-metrics.json"
}

stage_eval_lora() {  # issue 25: the merged export vs base + adapter through vLLM's LoRA path, same prompts
  export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
  local e=$R/$RUN/eval
  timed eval_merged "$PY" -m evaluator.cli run --config "$EVAL_CONFIG" --model "$R/$RUN/export" --data "$D" \
    --out "$e/merged" --seeds 0
  timed eval_adapter "$PY" -m evaluator.cli run --config "$EVAL_CONFIG" --model "$M" --adapter "$R/$RUN/export-adapter" \
    --data "$D" --out "$e/adapter" --seeds 0
  "$PY" -m evaluator.cli compare "$e/merged" "$e/adapter" --out "$e/compare"
  cp "$e/merged/metrics.json" "$OUTDIR/$RUN-eval-merged-metrics.json"
  cp "$e/adapter/metrics.json" "$OUTDIR/$RUN-eval-adapter-metrics.json"
}

stage_export_train() {
  # bench/export_logits.py trains its own few steps in-process, saves the engine's probe logits and exports;
  # the Ray run's checkpoints go first (already exported; a 64 GiB disk holds few 14.5 GB copies)
  [ -n "${KEEP_CHECKPOINTS:-}" ] || rm -rf "$R/$RUN"/checkpoint_*
  local x=$W/export-check
  rm -rf "$x"
  # shellcheck disable=SC2086
  timed export_check_train "$PY" bench/export_logits.py train --model "$M" --data "$D" --work "$x" --config "$PRESET" \
    ${EXPORT_CHECK_ARGS:-} 2>&1 | grep -v WARNING | tail -n 5
  rm -rf "$x/runs"  # its own weights-only checkpoint: the check reads the export
}

stage_export_check() {  # the export vs the trained engine: transformers logits, vLLM prompt log-probs
  export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
  timed export_check "$PY" bench/export_logits.py check --work "$W/export-check" --eval-config "$EVAL_CONFIG" 2>&1 \
    | grep -v WARNING | tail -n 40
}

stage_eval_speed() {  # issue 15: raw vLLM vs the evaluator on one engine, cold compile cache, then the warm CLI
  export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
  "$PY" bench/eval_speed.py --model "$M" --data "$D" --config "$EVAL_CONFIG" --cache-root "$W/vllm-cache" \
    --fresh-cache --work-dir "$W/eval-speed" --json-out "$W/eval-speed.json" 2>&1 | grep -v WARNING | tail -n 40
  cp "$W/eval-speed.json" "$OUTDIR/"
}

stage_record() {
  local name=gpu-pipeline; [ "$RUN" = gpu-pipeline ] || name=gpu-pipeline-$RUN
  "$PY" bench/gpu_pipeline_record.py --work "$W" --timings "$T" --run "$R/$RUN" --preset "$PRESET" \
    --arch "$ARCH${LAYERS:+ ($LAYERS layers)}" --bench-variant "${RECORD_VARIANT:-preset-1gpu}" \
    --out "$OUTDIR/$name-$(date +%Y-%m-%d).json"
}

[ $# -gt 0 ] || { sed -n '2,30p' "$0"; exit 2; }
for s in "$@"; do
  echo "== gpu_pipeline: $s ($(date +%T))"
  "stage_${s//-/_}"
done
