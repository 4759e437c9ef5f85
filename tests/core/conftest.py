"""Fixtures for the core tests: real Llama 3 and Mistral v0.2 tokenizers."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Llama 3 and Mistral v0.2 tokenizers built from the vocabularies on PyPI."""
    spec = importlib.util.spec_from_file_location(
        "real_tokenizers", ROOT / "bench" / "real_tokenizers.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("tokenizers")
    return {
        "llama3": module.build_llama3(out / "llama3"),
        "mistral_v2": module.build_mistral_v2(out / "mistral"),
    }
