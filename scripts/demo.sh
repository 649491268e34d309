#!/usr/bin/env bash
# `make demo`: the main job on the embedded default, end to end on this machine's CPUs.
#   tiny Mistral (real v3 tokenizer) -> synthetic Dolly -> Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers
#   -> Hugging Face export -> vLLM (CPU) generation on the test split, base and fine-tuned -> ROUGE comparison
# usage: scripts/demo.sh [WORK_DIR]   (default: work/; a rerun starts the run afresh)
# Its output is about 60 lines; Ray's, DeepSpeed's and vLLM's own go to the log files the commands name.
# A smaller run (the test suite uses one): DEMO_EXAMPLES=1200 DEMO_TEST_SIZE=60 DEMO_TRAIN_ARGS="schedule.max_steps=60"
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-work}
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/.venv/bin:$PATH"
# vLLM's IPC sockets go to a temp dir of this run, removed at exit (a failed run too), not left in /tmp.
rpc=$(mktemp -d "${TMPDIR:-/tmp}/dolly-demo.XXXXXX")
trap 'rm -rf "$rpc"' EXIT
export VLLM_RPC_BASE_PATH=$rpc
run=tiny-demo
model=$work/models/tiny
data=$work/data/synthetic
run_dir=$work/runs/$run
start=$(date +%s)
step() { printf '==> [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

step "init-tiny-model -> $model"
dolly-train init-tiny-model --out "$model"

step "prepare synthetic Dolly -> $data"
dolly-train prepare --source synthetic --num-examples "${DEMO_EXAMPLES:-3000}" --tokenizer "$model" --max-length 512 \
  --val-size 100 --test-size "${DEMO_TEST_SIZE:-200}" --seed 0 --out "$data"

step "train (cpu-tiny: 2 Ray workers, DeepSpeed ZeRO-2) -> $run_dir"
rm -rf "$run_dir"
read -r -a train_args <<< "${DEMO_TRAIN_ARGS:-}"  # extra section.key=value overrides
dolly-train train --config cpu-tiny "model.path=$model" "data.path=$data" \
  "checkpoint.storage_path=$work/runs" "checkpoint.run_name=$run" "${train_args[@]}"

step "evaluate the untrained base model (vLLM, CPU)"
dolly-eval run --config evaluator/configs/cpu-tiny.yaml --model "$model" --data "$data" --out "$run_dir/eval/base"

step "evaluate the fine-tuned export (vLLM, CPU)"
dolly-eval run --config evaluator/configs/cpu-tiny.yaml --model "$run_dir/export" --data "$data" --out "$run_dir/eval/tuned"

step "compare base vs fine-tuned"
# --brief: the headline and the overall rows; the per-category rows are in compare.md/.html/.json.
dolly-eval compare "$run_dir/eval/base" "$run_dir/eval/tuned" --out "$run_dir/eval/compare" --brief

step "done in $(( $(date +%s) - start ))s"
echo "training metrics: $run_dir/metrics.jsonl (TensorBoard: $run_dir/tensorboard)"
echo "report:           $run_dir/eval/compare/compare.md  (+ .html, tuned report: $run_dir/eval/tuned/report.html)"
