#!/usr/bin/env bash
# Two training workers on one machine, sharing one Redis and one Postgres: one worker per GPU
# (CUDA_VISIBLE_DEVICES=0 and 1; on a CPU-only host they train on the CPU, one core each).
# Submits two jobs and shows they ran at the same time, each on its own worker.
#
#   MEDTUNE_DATABASE_URL=postgresql+psycopg://user@127.0.0.1:5432/medtune \
#   MEDTUNE_BROKER_URL=redis://127.0.0.1:6379/0 scripts/two_workers.sh [max_steps]
#
# MEDTUNE_HOME (default: a new temporary folder) holds the artifacts and the logs;
# MEDTUNE_PORT (default 8765) is the API's port. Exits 0 only if both jobs succeeded on
# different workers with overlapping running intervals.
set -euo pipefail

: "${MEDTUNE_DATABASE_URL:?set MEDTUNE_DATABASE_URL to the shared Postgres job store}"
: "${MEDTUNE_BROKER_URL:?set MEDTUNE_BROKER_URL to the shared Redis broker}"
STEPS="${1:-8}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MEDTUNE="${MEDTUNE:-$ROOT/.venv/bin/medtune}"
[ -x "$MEDTUNE" ] || MEDTUNE=medtune
PY="$(dirname "$(command -v "$MEDTUNE")")/python"
[ -x "$PY" ] || PY=python3
export MEDTUNE_HOME="${MEDTUNE_HOME:-$(mktemp -d -t medtune-two-workers.XXXXXX)}"
export MEDTUNE_URL="http://127.0.0.1:${MEDTUNE_PORT:-8765}"
LOGS="$MEDTUNE_HOME/logs"
mkdir -p "$LOGS"
PIDS=()

stop() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT

"$MEDTUNE" migrate
"$MEDTUNE" api --host 127.0.0.1 --port "${MEDTUNE_PORT:-8765}" >"$LOGS/api.log" 2>&1 &
PIDS+=($!)
for gpu in 0 1; do
  # One process per GPU: the worker sees only its card, announces its memory and consumes
  # that memory class's queue (CPU workers: medtune.train). One CPU core each here.
  CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=1 \
    "$MEDTUNE" worker --queues medtune.train --name "gpu$gpu" >"$LOGS/gpu$gpu.log" 2>&1 &
  PIDS+=($!)
done

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "timed out waiting for $what; logs in $LOGS" >&2; exit 1; }
    sleep 0.5
  done
}
wait_for 120 "the API" "$PY" -c "import httpx, sys; httpx.get('$MEDTUNE_URL/healthz').raise_for_status()"
for gpu in 0 1; do wait_for 180 "worker gpu$gpu" grep -q "gpu$gpu@.* ready" "$LOGS/gpu$gpu.log"; done
echo "API at $MEDTUNE_URL, workers gpu0 and gpu1 ready (logs: $LOGS)"

SPEC="$MEDTUNE_HOME/spec.json"
cat >"$SPEC" <<EOF
{"model_config": {"base_model": "smollm2-135m-instruct", "finetuned_model": "two-workers",
                  "max_seq_length": 256},
 "training_dataset": {"name": "sample:medical_qa"},
 "training_config": {"max_steps": $STEPS, "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "save_steps": 0}}
EOF
job_id() { "$PY" -c "import json, sys; print(json.load(sys.stdin)['id'])"; }
FIRST=$("$MEDTUNE" jobs create -f "$SPEC" --json | job_id)
SECOND=$("$MEDTUNE" jobs create -f "$SPEC" --json | job_id)
echo "submitted $FIRST and $SECOND"
for job in "$FIRST" "$SECOND"; do
  wait_for 900 "job $job to finish" "$PY" -c "
import httpx, sys
status = httpx.get('$MEDTUNE_URL/jobs/$job').json()['status']
sys.exit(0 if status in ('succeeded', 'failed', 'cancelled') else 1)"
done

"$PY" - "$FIRST" "$SECOND" <<'EOF'
import os
import sys
from datetime import datetime

import httpx

jobs = [httpx.get(f"{os.environ['MEDTUNE_URL']}/jobs/{j}").json() for j in sys.argv[1:]]
for job in jobs:
    print(f"job {job['id']} {job['status']} on {job['worker']}: "
          f"{job['started_at']} -> {job['finished_at']}")
start = [datetime.fromisoformat(j["started_at"]) for j in jobs]
end = [datetime.fromisoformat(j["finished_at"]) for j in jobs]
overlap = (min(end) - max(start)).total_seconds()
ok = all(j["status"] == "succeeded" for j in jobs) and jobs[0]["worker"] != jobs[1]["worker"]
print(f"different workers: {jobs[0]['worker'] != jobs[1]['worker']}; "
      f"ran together for {max(overlap, 0):.1f} s")
sys.exit(0 if ok and overlap > 0 else 1)
EOF
