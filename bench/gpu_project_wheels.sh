#!/usr/bin/env bash
# Adds the project's own small dependencies (what core/, the tests and the bench scripts import
# beside torch/transformers/peft) to the GPU bundle DIR, as cp312 wheels, at the versions the
# CPU venv runs. The GPU machine has no registry: see ../shared/gpu/README.md and BENCHMARKS.md.
#   bench/gpu_project_wheels.sh [DIR=.whl] [VENV=.venv]
set -euo pipefail
DIR=${1:-.whl} VENV=${2:-.venv}
PKGS=(pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
      sqlmodel sqlalchemy greenlet alembic mako httpx httpcore h11 anyio idna certifi
      redis pytest pluggy iniconfig pytest-timeout tensorboardX protobuf)
PINS=()
for p in "${PKGS[@]}"; do
  v=$("$VENV/bin/python" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  PINS+=("$p==${v:?$p is not installed in $VENV}")
done
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" -d "$DIR" "${PINS[@]}"
du -sh "$DIR"
