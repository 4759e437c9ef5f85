#!/usr/bin/env bash
# Issue 13 on the lent GPU: medtune's trainer in-process (train: one run per checkpointing
# variant in CKPT, e.g. unsloth,false,auto, on one kept base; CAP=15 caps it at a T4's memory),
# the recipe's notebook (notebook: its steady seconds per step, the baseline of a job run on the
# same machine), the whole job through `medtune up`, a fresh worker then a warm one (job), or the
# notebook and then the jobs in one call (notebook+job: the ratio from one run).
#   bench/gpu_recipe_job.sh WORK_DIR TOKENIZERS_DIR DATA.jsonl train|notebook|job|notebook+job
# Needs CUDA, the project on PYTHONPATH and the .whl bundle (BENCHMARKS.md); NOTEBOOK is the
# copy of ../shared/gpu/notebook_baseline.py that travelled (default .gpu/notebook_baseline.py).
# STEPS (default 60) is the step count of the train mode; JOB_STEPS (250) the job's.
set -uo pipefail
WORK=$1 TOKS=$2 DATA=$(realpath "$3") MODE=$4
STEPS=${STEPS:-60} JOB_STEPS=${JOB_STEPS:-250} NOTEBOOK=${NOTEBOOK:-.gpu/notebook_baseline.py}
export BENCH_OUT=${BENCH_OUT:-$WORK/results.jsonl}
MODEL=$WORK/llama3-8b
export MEDTUNE_DATA_ROOTS="[\"$(dirname "$DATA")\"]" MEDTUNE_MODEL_ROOTS="[\"$WORK\"]"
mkdir -p "$WORK"
[ -f "$MODEL/config.json" ] || timeout 300 python3 bench/gpu_train.py make llama3-8b "$TOKS/llama3" "$MODEL"
if [ "$MODE" = notebook ] || [ "$MODE" = notebook+job ]; then
  echo "== notebook baseline, $STEPS steps" >&2
  timeout 330 python3 "$NOTEBOOK" "$MODEL" "$DATA" "$STEPS" 2>&1 | tee "$WORK/notebook.log" | grep '^{'
  grep '^{"stack"' "$WORK/notebook.log" >> "$BENCH_OUT"
fi
if [ "$MODE" = train ]; then
  echo "== medtune trainer, $STEPS steps, checkpointing ${CKPT:-unsloth}, cap ${CAP:-none}" >&2
  timeout "${TRAIN_TIMEOUT_S:-330}" python3 bench/recipe_job.py train "$MODEL" "$DATA" \
    --steps "$STEPS" --checkpointing "${CKPT:-unsloth}" ${CAP:+--cap-gib "$CAP"}
fi
if [ "$MODE" = job ] || [ "$MODE" = notebook+job ]; then
  echo "== medtune up, ${JOBS:-2} jobs of $JOB_STEPS steps" >&2
  python3 bench/recipe_job.py job "$MODEL" "$DATA" --steps "$JOB_STEPS" --jobs "${JOBS:-2}" \
    --timeout-s "${JOB_TIMEOUT_S:-400}"
fi
