#!/usr/bin/env bash
# Issue #14 on the lent GPU, every part in one run, each in its own process with its own limit:
# a part that fails prints "== FAILED <part> (exit N)" and the next one still runs.
#   bench/gpu_infer_ready.sh WORK_DIR TOKENIZERS_DIR DATA.jsonl
# Needs CUDA, the project on PYTHONPATH and the .whl bundle (README, GPU). Figures go to
# $BENCH_OUT (default WORK_DIR/results.jsonl) as JSON lines; with BENCH_LOG_DIR set, the live
# part's services.log (API and both workers) is copied there.
#  1 make   the Llama-3-8B shape (random weights, Llama 3 tokenizer) and 8 random adapters
#  2 multi-lora  8 questions to 8 adapters through the batched multi-LoRA fast lane: one after
#           another vs at once, token-for-token check (issue #14 (a), goal >= 3x)
#  3 live   medtune up, a 5-step job, first answer after `succeeded`, then for_inference -> fast
#  4 t4     under a 15 GiB cap: 4-bit + LoRA through the CUDA-graph loop vs for_inference
#  5 merged the in-memory merged bf16 path alone (the live part's fast path, in-process)
#  6 multi  the same 8 questions through for_inference (Unsloth) and peft's mixed batch
# Parts 4-6 were measured on 2026-12-03 (BENCHMARKS.md): with the budget spent they are skipped.
# BUDGET_S (default 480) bounds the whole run: a part gets at most what is left, and a part
# with under 40 s left is skipped (said so), so the run ends within the device's 10 minutes.
set -uo pipefail
WORK=$1 TOKS=$2 DATA=$(realpath "$3")
export BENCH_OUT=${BENCH_OUT:-$WORK/results.jsonl} PYTHONUNBUFFERED=1
END=$((SECONDS + ${BUDGET_S:-480}))
mkdir -p "$WORK"
part() {  # part NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local left=$((END - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 40 ]; then
    echo "== SKIPPED $name: ${left}s of the budget left" >&2
    echo "{\"part\": \"$name\", \"skipped\": \"budget\"}" >> "$BENCH_OUT"
    return 0
  fi
  echo "== $name (limit ${limit}s) $(date +%T)" >&2
  timeout "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || { echo "== FAILED $name (exit $rc)" >&2; echo "{\"part\": \"$name\", \"failed\": $rc}" >> "$BENCH_OUT"; }
  return 0
}
part make 150 python3 bench/infer_gpu.py make "$TOKS/llama3" "$WORK" --adapters 8
[ -f "$WORK/model/config.json" ] || { echo "== no model: nothing else can run" >&2; exit 1; }
part multi-lora 170 python3 bench/infer_ready.py multi-lora "$WORK" --adapters 8 --tokens 64
part live 260 python3 bench/infer_ready.py live "$WORK/model" "$DATA" --steps 5 --fast-wait-s 120
part t4-graph 130 python3 bench/infer_gpu.py run bnb4_lora_graph "$WORK" --tokens 64 --runs 2 --cap-gib 15
part t4-for_inference 80 python3 bench/infer_gpu.py run unsloth_4bit_lora "$WORK" --tokens 64 --runs 2 --cap-gib 15
part merged 110 python3 bench/infer_gpu.py run bf16_merged_graph "$WORK" --tokens 128 --runs 2
part multi 110 python3 bench/infer_ready.py multi "$WORK" --adapters 8 --tokens 32
echo "== done $(date +%T); figures in $BENCH_OUT" >&2
