"""GPU tests: skipped without CUDA, run on the GPU machine (see BENCHMARKS.md for the command).

The models are random-weight Llama shapes with the real Llama 3 tokenizer: weights do not matter
for what these tests check (the Unsloth code path runs, trains, saves, merges and loads back), and
no hub is reachable from the GPU machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    """Llama 3's real tokenizer, built by bench/real_tokenizers.py (carried in .gpu/)."""
    path = Path(os.environ.get("MEDTUNE_GPU_TOKENIZERS", ROOT / ".gpu" / "tokenizers")) / "llama3"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"no Llama 3 tokenizer at {path}: run bench/real_tokenizers.py .gpu/tokenizers")
    return path


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory: pytest.TempPathFactory, llama3_tokenizer_dir: Path) -> Path:
    """A small random Llama with Llama 3's tokenizer, its chat template and end of turn."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama3")
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
