"""The llama.cpp that `make setup` installs is built for AVX2/FMA/F16C, as Dockerfile.gpu's is,
not for the build machine's CPU: a native build on an AMX host (Sapphire Rapids) repacked the
weights for ggml's AMX kernels and crashed in llama_decode (SIGSEGV in
ggml_backend_amx_mul_mat), taking the whole test process with it."""

from __future__ import annotations

import re

import pytest

from tests.deploy.helpers import DOCKERFILE_GPU, ROOT

llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra: pip install -e '.[gguf]'")


def cpu_features() -> dict[str, int]:
    info = llama_cpp.llama_print_system_info().decode()
    return {name: int(on) for name, on in re.findall(r"(\w+) = (\d)", info)}


def test_the_installed_llama_cpp_targets_avx2_not_this_cpu() -> None:
    features = cpu_features()
    assert features.get("AVX2") == 1 and features.get("FMA") == 1, features
    assert not features.get("AVX512") and not features.get("AMX_INT8"), features


def test_make_and_the_image_build_llama_cpp_with_the_same_flags() -> None:
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = DOCKERFILE_GPU.read_text()
    flags = re.search(r"^LLAMA_CMAKE_ARGS := (.+)$", makefile, re.M)
    assert flags, "Makefile: LLAMA_CMAKE_ARGS"
    assert f'CMAKE_ARGS="{flags.group(1)}"' in dockerfile
