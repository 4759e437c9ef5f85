#!/usr/bin/env bash
# Issue 7's soak on a GPU host: 200 metric pollers and 50 SSE listeners for 60 s while an
# Unsloth QLoRA job trains on the GPU, with the API (and the load generator, Redis and
# PostgreSQL) on CPUs of their own, apart from the training worker's.
#   bench/gpu_soak.sh SERVERS_DIR MODEL_DIR DATA.jsonl OUT.json
# SERVERS_DIR holds servers.tar.xz from bench/gpu_soak_bundle.sh; MODEL_DIR a model folder
# (bench/gpu_train.py make ...); DATA a JSONL training set inside MEDTUNE_DATA_ROOTS.
# API_CPUS (default 0-5) and WORKER_CPUS (default 6-N) split the machine; PG_PORT and
# REDIS_PORT (5432, 6379) place the servers; SPEC=FILE replaces the GPU job (a CPU rehearsal).
# The job packs its rows: every step then holds the same number of tokens, so the windows'
# step times compare like with like (unpacked, a step's time follows its rows' lengths).
set -euo pipefail
SERVERS=$1 MODEL=$(realpath -m "$2") DATA=$(realpath -m "$3") OUT=$4
last=$(($(nproc) - 1))
API_CPUS=${API_CPUS:-0-5} WORKER_CPUS=${WORKER_CPUS:-6-$last}
PG_PORT=${PG_PORT:-5432} REDIS_PORT=${REDIS_PORT:-6379}
export MEDTUNE_TEST_PG=postgresql://postgres@127.0.0.1:$PG_PORT/postgres
export MEDTUNE_SOAK_REDIS=redis://127.0.0.1:$REDIS_PORT
# The job's base_model is a local folder: the service accepts it only inside a model root.
export MEDTUNE_MODEL_ROOTS=${MEDTUNE_MODEL_ROOTS:-[\"$(dirname "$MODEL")\"]}
run=/tmp/medtune-soak-servers
rm -rf "$run" && mkdir -p "$run/pg"
# Python unpacks it: the GPU machine may have no xz.
python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
  "$SERVERS/servers.tar.xz" "$run"
export LD_LIBRARY_PATH=$run/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
taskset -c "$API_CPUS" "$run/bin/redis-server" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
  --appendonly no --daemonize yes --logfile "$run/redis.log"
# PostgreSQL refuses to run as root: the cluster belongs to nobody.
chown -R nobody "$run/pg"
as_nobody() { (cd "$run" && setpriv --reuid=65534 --regid=65534 --clear-groups "$@"); }
as_nobody "$run/bin/initdb" -D "$run/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
as_nobody taskset -c "$API_CPUS" "$run/bin/pg_ctl" -D "$run/pg/data" -l "$run/pg/log" -w \
  -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $run/pg -c fsync=off -c max_connections=300" start
stop() {
  as_nobody "$run/bin/pg_ctl" -D "$run/pg/data" -m fast -w stop || true
  pkill -f "$run/bin/redis-server" || true
}
trap stop EXIT
spec=${SPEC:-$(mktemp --suffix=.json)}
[ -n "${SPEC:-}" ] || cat > "$spec" <<JSON
{
  "model_config": {"base_model": "$MODEL", "finetuned_model": "llama3-8b-soak",
                   "max_seq_length": 2048, "load_in_4bit": true},
  "lora_config": {"r": 16, "lora_alpha": 16, "lora_dropout": 0,
                  "use_gradient_checkpointing": "unsloth"},
  "training_dataset": {"name": "$DATA"},
  "training_config": {"engine": "unsloth", "packing": true, "per_device_train_batch_size": 2,
                      "gradient_accumulation_steps": 4, "max_steps": 3000, "num_train_epochs": 20,
                      "warmup_steps": 5, "learning_rate": 0.0002, "optim": "adamw_8bit",
                      "logging_steps": 1, "save_steps": 0}
}
JSON
"${PYTHON:-python3}" bench/load_soak.py --spec "$spec" --api-cpus "$API_CPUS" --worker-cpus "$WORKER_CPUS" \
  --quiet-s "${QUIET_S:-40}" --load-s "${LOAD_S:-60}" --train-timeout-s 420 --out "$OUT"
