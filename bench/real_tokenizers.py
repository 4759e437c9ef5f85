"""Build Hugging Face tokenizer folders from the real vocabulary files shipped on PyPI.

Llama 3's tiktoken file ships in ``llama-models`` and Mistral 7B's SentencePiece model in
``mistral-common`` (install both with ``pip install --no-deps``). With random weights of the real
architecture they give faithful speed and memory figures, and golden template tests.

    python bench/real_tokenizers.py OUT_DIR   # writes OUT_DIR/llama3 and OUT_DIR/mistral_v2
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from core.data.templates import LLAMA3, MISTRAL_V2

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{package}/{relative} not found; pip install --no-deps {package.replace('_', '-')}"
    )


def llama3_special_tokens() -> list[str]:
    # The Llama 3 layout: 256 special tokens after the 128,000 BPE ranks (llama_models/llama3).
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


def build_llama3(out: Path) -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = package_file("llama_models", "llama3/tokenizer.model")
    converted = TikTokenConverter(
        vocab_file=str(model_file),
        pattern=LLAMA3_PATTERN,
        extra_special_tokens=llama3_special_tokens(),
    ).converted()
    # As the Hub's tokenizer.json: encode() opens with <|begin_of_text|> (the converter adds no
    # BOS; without it llama.cpp's pre-tokenizer hash and add_bos_token came out wrong).
    bos = "<|begin_of_text|>"
    converted.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, converted.token_to_id(bos))],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=8192,
    )
    tok.chat_template = LLAMA3
    tok.save_pretrained(out)
    return tok


def build_mistral_v2(out: Path) -> Any:
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    model_file = package_file("mistral_common", "data/tokenizer.model.v1")
    with tempfile.TemporaryDirectory() as tmp:
        # transformers converts a SentencePiece model it finds as tokenizer.model in a folder.
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True)
    tok.chat_template = MISTRAL_V2
    tok.model_max_length = 32768
    tok.save_pretrained(out)
    return tok


def main(out_dir: str) -> None:
    root = Path(out_dir)
    for name, build in (("llama3", build_llama3), ("mistral_v2", build_mistral_v2)):
        tok = build(root / name)
        print(
            f"{name}: vocab {len(tok)}, bos {tok.bos_token}={tok.bos_token_id}, "
            f"eos {tok.eos_token}={tok.eos_token_id} -> {root / name}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".medtune/tokenizers")
