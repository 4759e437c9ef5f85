"""GGUF export of SmolLM2: f16 written with the gguf package, q8_0/q4_k_m by llama.cpp, all
answering through llama.cpp and stopping at the end-of-turn token; other models' tokenizers."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from core.errors import ExportError
from core.export import gguf as gguf_export
from core.export.formats import GGUF_DIR, SMOKE_QUESTIONS
from tests.core.export import export_helpers

pytest.importorskip("llama_cpp", reason="the gguf extra: pip install -e '.[gguf]'")

pytestmark = pytest.mark.slow
QUANTS = ["f16", "q8_0", "q4_k_m"]
MISTRAL_SP_MODEL = str(files("mistral_common") / "data" / "tokenizer.model.v1")
# The smoke answers are bounded (the untuned SmolLM2 may run past it on the second question);
# stopping at the end-of-turn token is checked below with a question answered in a few words.
TOKENS = 48


def export(job_dir: Path, model_dir: Path, formats: list[str], quants: list[str]) -> Any:
    return export_helpers.export(job_dir, model_dir, formats, quants, gguf_tokens=TOKENS)


def _finish_on_end_of_turn(path: Path, end_of_turn: int) -> str:
    """Force the model's end-of-turn token first: llama.cpp must end the answer there.

    With a wrong eos in the file (the converter's ``<|im_start|>``), it would decode on.
    """
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, seed=0, verbose=False)
    try:
        reply: Any = llm.create_chat_completion(
            messages=[{"role": "user", "content": "What is anemia?"}],
            max_tokens=8,
            temperature=0.0,
            logit_bias={end_of_turn: 100.0},
        )
    finally:
        llm.close()
    return str(reply["choices"][0]["finish_reason"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[Path, Any]:
    job_dir = tmp_path_factory.mktemp("job")
    return job_dir, export(job_dir, model_dir, ["gguf"], QUANTS)


def test_every_quantization_answers_through_llama_cpp_and_stops(
    exported: tuple[Path, Any],
) -> None:
    job_dir, manifest = exported
    assert set(manifest) == {f"gguf_{q}" for q in QUANTS}
    sizes = {}
    for quant in QUANTS:
        entry = manifest[f"gguf_{quant}"]
        assert entry["status"] == "ok", entry
        assert entry["folder"] == GGUF_DIR
        [described] = entry["files"]
        assert described["file"] == gguf_export.file_name(quant)
        data = (job_dir / GGUF_DIR / described["file"]).read_bytes()
        assert described["bytes"] == len(data)
        assert described["sha256"] == hashlib.sha256(data).hexdigest()
        sizes[quant] = len(data)
        assert [a["question"] for a in entry["smoke_test"]] == SMOKE_QUESTIONS
        for answer in entry["smoke_test"]:
            assert answer["answer"], answer
            assert answer["stopped"] == (answer["finish_reason"] == "stop"), answer
            assert 0 < answer["tokens"] <= TOKENS
        assert _finish_on_end_of_turn(job_dir / GGUF_DIR / described["file"], 2) == "stop"
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    # Only the artifacts are left: no staging merge, no temporary files.
    assert sorted(p.name for p in (job_dir / GGUF_DIR).iterdir()) == sorted(
        gguf_export.file_name(q) for q in QUANTS
    )
    assert not (job_dir / ".merged-staging").exists()


def test_f16_metadata_names_the_end_of_turn_token_and_template(
    exported: tuple[Path, Any], tokenizer: Any
) -> None:
    from gguf import GGUFReader

    job_dir, _ = exported
    fields = GGUFReader(job_dir / GGUF_DIR / gguf_export.file_name("f16")).fields

    def value(key: str) -> Any:
        field = fields[key]
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types[0].name == "STRING" else part[0].item()

    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "smollm"
    assert value("tokenizer.ggml.eos_token_id") == 2 == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert value("tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id != 2
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    assert value("llama.attention.head_count_kv") == 3


def test_f16_logits_match_transformers(
    exported: tuple[Path, Any], model_dir: Path, tokenizer: Any
) -> None:
    """The q/k permutation and every tensor's place: llama.cpp's next-token logits agree."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    job_dir, _ = exported
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What causes anemia?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = Llama(
        str(job_dir / GGUF_DIR / gguf_export.file_name("f16")),
        n_ctx=256,
        logits_all=True,
        verbose=False,
    )
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95
    assert np.abs(ours - theirs).max() < 0.5  # f16 weights; logits span about +-30


def test_a_failing_quantization_fails_alone(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gguf_export.quantize

    def broken(source: Path, target: Path, quant: str) -> None:
        if quant == "q8_0":
            raise ExportError("no", code="gguf_quantize_failed")
        real(source, target, quant)

    monkeypatch.setattr(gguf_export, "quantize", broken)
    manifest = export(tmp_path, model_dir, ["lora", "gguf"], ["q8_0", "q4_k_m"])
    assert manifest["lora"]["status"] == "ok"
    assert manifest["gguf_q8_0"] == {
        "status": "failed",
        "error": {"code": "gguf_quantize_failed", "message": "no"},
    }
    assert manifest["gguf_q4_k_m"]["status"] == "ok"
    # The f16 file the quantizations start from was not asked for, so it is gone.
    assert [p.name for p in (tmp_path / GGUF_DIR).iterdir()] == ["model-q4_k_m.gguf"]
    assert json.loads((tmp_path / "artifacts.json").read_text()) == manifest


# Texts where a pre-tokenizer or merge mismatch shows: digit runs, contractions in any case,
# newlines and tabs, emoji (ZWJ sequences), non-Latin scripts, runs of spaces and punctuation.
HARD_TEXTS = [
    "What is high blood pressure?",
    "Ibuprofen 400 mg, twice daily.",
    "12345 3.14159 1,000,000 (2024-05-17) 007",
    "I'VE told you; we'Ll see. THEY'RE here, it's 'D and 'm",
    "line one\n\nline two\r\n\tindented   \n \n\n\n  end",
    "🦙🚀 fever 😶\u200d🌫️ ✅ 👩🏽\u200d⚕️",
    "Привет мир, 我想在apple工作1314151天\uff5e كيف حالك កាន់តែពិសេស",
    "   leading and trailing spaces   ",
    "''''```\"\"\"......!!!!?????------=======",
    gguf_export._PRE_CHECK_TEXT,
]
# Llama 3's tokenizer.json as transformers' tiktoken converter writes it: no BOS template.
NO_BOS_TEMPLATE = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False}


def _tiny_llama(folder: Path, tokenizer: Any) -> None:
    """A one-layer Llama with random weights and ``tokenizer``'s vocabulary, saved in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _edit_tokenizer_json(folder: Path, edit: Any) -> Any:
    """Change the saved tokenizer.json with ``edit`` and load the tokenizer back from it."""
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(folder)


def _gguf_value(path: Path, key: str) -> Any:
    from gguf import GGUFReader

    field = GGUFReader(path).fields[key]
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types[0].name == "STRING" else part[0].item()


@pytest.mark.parametrize("name", ["llama3", "llama3_without_bos_template", "mistral_v2"])
def test_other_llama_tokenizers_tokenize_the_same_in_llama_cpp(
    tmp_path: Path, real: dict[str, Any], name: str
) -> None:
    """Llama 3 (byte-level BPE, llama-bpe) and Mistral 7B (SentencePiece) vocabularies.

    Llama 3 as the Hub ships it is recognised by llama.cpp's own pre-tokenizer hash; saved
    without its BOS template that hash changes, and its tokenizer.json spec names it instead.
    """
    import llama_cpp
    from llama_cpp import Llama

    tokenizer = real[name.removesuffix("_without_bos_template")]
    folder = tmp_path / "model"
    _tiny_llama(folder, tokenizer)
    if name == "llama3_without_bos_template":
        tokenizer = _edit_tokenizer_json(
            folder, lambda spec: spec.update(post_processor=NO_BOS_TEMPLATE)
        )
        assert tokenizer.encode("a")[0] != tokenizer.bos_token_id
    if name == "mistral_v2":  # as Mistral's own repository ships it beside tokenizer.json
        shutil.copy(MISTRAL_SP_MODEL, folder / "tokenizer.model")
    if name.startswith("llama3"):
        # Which route names it: llama.cpp's hash (the Hub's Llama 3, BOS included) or the spec.
        digest = hashlib.sha256(str(tokenizer.encode(gguf_export._PRE_CHECK_TEXT)).encode())
        by_hash = gguf_export._KNOWN_BPE_PRE.get(digest.hexdigest())
        assert by_hash == ("llama-bpe" if name == "llama3" else None)
    target = tmp_path / "model.gguf"
    gguf_export.write_f16(folder, target, name=name)
    if name.startswith("llama3"):
        assert _gguf_value(target, "tokenizer.ggml.pre") == "llama-bpe"
    expected = [tokenizer.encode(text, add_special_tokens=False) for text in HARD_TEXTS]
    if name == "mistral_v2":
        # Mistral's own tokenizer is SentencePiece, and llama.cpp's follows it; transformers'
        # converted one merges a run of spaces before a word otherwise ("a  b": '▁▁' 'b', not
        # '▁' '▁b'), so here SentencePiece is the reference.
        import sentencepiece

        own = sentencepiece.SentencePieceProcessor(model_file=MISTRAL_SP_MODEL)
        expected = [own.encode(text) for text in HARD_TEXTS]
    # What encode() adds around any text: <|begin_of_text|> or <s>, or nothing.
    added = tokenizer.encode("")
    llm = Llama(str(target), vocab_only=True, verbose=False)
    try:
        assert llm.token_eos() == tokenizer.eos_token_id
        assert llm.token_bos() == tokenizer.bos_token_id
        for text, ids in zip(HARD_TEXTS, expected, strict=True):
            assert llm.tokenize(text.encode(), add_bos=False) == ids, text
            # add_bos=True is llama.cpp's default: its BOS only where transformers adds one.
            assert llm.tokenize(text.encode(), add_bos=True) == added + ids, text
        chat = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": "Is 38.5 C a fever?"},
                {"role": "assistant", "content": "Yes."},
            ],
            tokenize=False,
        )
        # Only for byte-level BPE: llama.cpp's SentencePiece puts a '▁' after every special
        # token, so Mistral's "<s> [INST]" comes out with one token more than in transformers.
        if name.startswith("llama3"):
            assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer.encode(
                chat, add_special_tokens=False
            )
        # llama.cpp stops generating on these: the eos (the end of turn) must be one.
        vocab = llm._model.vocab
        eog = {t for t in range(len(tokenizer)) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    finally:
        llm.close()
    assert tokenizer.eos_token_id in eog
    if name.startswith("llama3"):
        assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|eot_id|>"
        ends = ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
        assert eog == set(tokenizer.convert_tokens_to_ids(ends))
        assert _finish_on_end_of_turn(target, tokenizer.eos_token_id) == "stop"


def test_an_unknown_bpe_pre_tokenizer_is_refused(tmp_path: Path, real: dict[str, Any]) -> None:
    """Llama 3's vocabulary with digits split one by one: llama.cpp's llama-bpe would group
    them by three, so neither the hash nor the spec may name it; no file is written."""
    folder = tmp_path / "model"
    _tiny_llama(folder, real["llama3"])

    def single_digits(spec: dict[str, Any]) -> None:
        split = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]
        split["Regex"] = split["Regex"].replace(r"\p{N}{1,3}", r"\p{N}")

    tokenizer = _edit_tokenizer_json(folder, single_digits)
    assert len(tokenizer.encode("12345", add_special_tokens=False)) == 5  # the edit took effect
    with pytest.raises(ExportError) as caught:
        gguf_export.write_f16(folder, tmp_path / "model.gguf", name="digits")
    assert caught.value.code == "gguf_unsupported_tokenizer"
    assert caught.value.field == "export_config.formats"
    assert not (tmp_path / "model.gguf").exists()
    assert not (tmp_path / "model.gguf.tmp").exists()


def test_a_sentencepiece_folder_without_its_model_file_is_refused(
    tmp_path: Path, real: dict[str, Any]
) -> None:
    """Without tokenizer.model the scores would come from tokenizer.json, and llama.cpp split
    'Ibuprofen' into other pieces than transformers: the export says so instead."""
    _tiny_llama(tmp_path / "model", real["mistral_v2"])
    with pytest.raises(ExportError) as caught:
        gguf_export.write_f16(tmp_path / "model", tmp_path / "model.gguf", name="mistral_v2")
    assert caught.value.code == "gguf_unsupported_tokenizer"
    assert "tokenizer.model" in caught.value.detail
    assert not (tmp_path / "model.gguf").exists()


def test_llama_cpp_is_asked_with_the_ids_the_model_trained_on(
    tmp_path: Path, real: dict[str, Any]
) -> None:
    """A Mistral chat tokenized by llama.cpp gets a space after each special token; the
    backend feeds llama.cpp the ids transformers made instead, as training did."""
    from llama_cpp import Llama

    from core.data.tokenize import render
    from core.inference.generate import GenerationRequest
    from core.inference.llamacpp import LlamaCppBackend

    tokenizer = real["mistral_v2"]
    folder = tmp_path / "model"
    _tiny_llama(folder, tokenizer)
    shutil.copy(MISTRAL_SP_MODEL, folder / "tokenizer.model")
    target = tmp_path / "model.gguf"
    gguf_export.write_f16(folder, target, name="mistral")
    messages = [{"role": "user", "content": "What is high blood pressure?"}]
    text = render(tokenizer, messages, add_generation_prompt=True)
    trained = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = Llama(str(target), vocab_only=True, verbose=False)
    try:
        own = llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert own != trained  # why the backend does not let llama.cpp tokenize the chat

    backend = LlamaCppBackend(loads=Counter(), n_threads=1)
    gen = backend.generate(
        str(target), tokenizer, GenerationRequest(messages=messages, max_new_tokens=1)
    )
    assert gen.prompt_tokens == len(trained)
