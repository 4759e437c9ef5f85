#!/usr/bin/env bash
# The issue-4 GPU measurements in one go, each stack in its own process.
#   bench/gpu_all.sh WORK_DIR TOKENIZERS_DIR DATA.jsonl [quick|second|third|tests|microbatch]
# Needs CUDA, the project on PYTHONPATH and the gpu extra (or the .whl bundle, see BENCHMARKS.md).
set -uo pipefail
WORK=$1 TOKS=$2 DATA=$3 MODE=${4:-full}
export BENCH_OUT=${BENCH_OUT:-$WORK/results.jsonl}
run() { echo "== $*" >&2; timeout "${STEP_TIMEOUT:-420}" python3 bench/gpu_train.py "$@"; }
if [ "$MODE" = quick ]; then  # a smoke run on the 1B shape
  run make llama3-1b "$TOKS/llama3" "$WORK/llama3-1b"
  run service "$WORK/llama3-1b" --engine unsloth --steps 4
  run service "$WORK/llama3-1b" --engine transformers --steps 4
  head -200 "$DATA" > "$WORK/small.jsonl"
  run epoch "$WORK/llama3-1b" "$WORK/small.jsonl"
  exit 0
fi
if [ "$MODE" = tests ]; then  # the gpu-marked tests, then the epoch cold and warm
  MEDTUNE_GPU_TOKENIZERS=$TOKS python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -o addopts=""
  run make llama3-8b "$TOKS/llama3" "$WORK/llama3-8b"
  run epoch "$WORK/llama3-8b" "$DATA" --repeat 2
  exit 0
fi
if [ "$MODE" = microbatch ]; then  # the same epoch at micro-batch 8 x 1 (same effective batch)
  run make llama3-8b "$TOKS/llama3" "$WORK/llama3-8b"
  run epoch "$WORK/llama3-8b" "$DATA" --bs 8 --grad-accum 1 --repeat 2
  exit 0
fi
if [ "$MODE" = third ]; then  # length-grouped packing, then no packing, on the recipe's epoch
  run make llama3-8b "$TOKS/llama3" "$WORK/llama3-8b"
  run epoch "$WORK/llama3-8b" "$DATA" --mode length_grouped
  run epoch "$WORK/llama3-8b" "$DATA" --no-packing
  exit 0
fi
if [ "$MODE" = second ]; then  # packing diagnosis and the Mistral shape
  run make llama3-8b "$TOKS/llama3" "$WORK/llama3-8b"
  TORCH_LOGS=recompiles run epoch "$WORK/llama3-8b" "$DATA" 2> "$WORK/epoch-packing.err"
  grep -c "Recompiling" "$WORK/epoch-packing.err" | sed 's/^/recompiles: /'
  run make mistral-7b "$TOKS/mistral_v2" "$WORK/mistral-7b"
  run service "$WORK/mistral-7b" --engine unsloth --steps 10
  rm -rf "$WORK/mistral-7b"
  run epoch "$WORK/llama3-8b" "$DATA" --no-packing
  exit 0
fi
run make llama3-8b "$TOKS/llama3" "$WORK/llama3-8b"
run service "$WORK/llama3-8b" --engine unsloth --steps 10
run bare "$WORK/llama3-8b" --steps 10
run epoch "$WORK/llama3-8b" "$DATA"
run service "$WORK/llama3-8b" --engine transformers --steps 6
