"""GGUF export, offline: write F16 with the ``gguf`` package, quantize with llama.cpp's library.

Route: the merged Hugging Face folder (safetensors + config + tokenizer) is written as an F16
GGUF by this module with ``gguf.GGUFWriter`` (tensor names from ``gguf.TensorNameMap``), then
``q8_0`` / ``q4_k_m`` are made from it by ``llama_cpp.llama_model_quantize``, the llama.cpp
library shipped inside the ``llama-cpp-python`` wheel (the ``gguf`` extra). Nothing is
downloaded or compiled at run time, unlike Unsloth's and LLaMA-Factory's exports.

Only the ``llama`` GGUF architecture is written (Llama 2/3, Mistral, SmolLM2 all are); others
fail with ``gguf_unsupported_architecture``. As llama.cpp's own converter does, the q/k
projections are permuted back to llama.cpp's rotary layout (transformers' GGUF loader undoes
exactly this permutation). The end-of-sequence id is the tokenizer's eos, which for a chat
model is its end-of-turn token (``<|im_end|>`` for SmolLM2: see core/embedded_model.py).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from core.errors import ExportError

QUANTIZATIONS = ("f16", "q8_0", "q4_k_m")
# GGUF's "llama" architecture covers these Hugging Face classes.
LLAMA_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM"})

# llama.cpp picks its BPE pre-tokenizer from "tokenizer.ggml.pre"; its converter finds the name
# by hashing how the tokenizer splits this text. Hashes and text copied from llama.cpp's
# convert_hf_to_gguf (get_vocab_base_pre), for the BPE tokenizers of llama-architecture models.
_PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天\uff5e ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_KNOWN_BPE_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM(2)
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}
# The hash covers what encode() adds too: Llama 3's holds only with its <|begin_of_text|>, so a
# Llama 3 tokenizer without that BOS template (as transformers' tiktoken converter builds it)
# hashes otherwise. It splits text exactly as llama.cpp's "llama-bpe" all the same when its
# tokenizer.json has this pre-tokenizer, no normalizer and a BPE with ignore_merges (llama-bpe
# too takes a piece found whole in the vocabulary as one token): then that spec names it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT_STEP = {
    "type": "Split",
    "pattern": {"Regex": _LLAMA3_SPLIT},
    "behavior": "Isolated",
    "invert": False,
}


def file_name(quant: str) -> str:
    """The artifact's file name inside the job's ``gguf/`` folder."""
    return f"model-{quant}.gguf"


@dataclass(frozen=True)
class _Hparams:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    config: dict[str, Any]


def _read_config(model_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    if archs[0] not in LLAMA_ARCHITECTURES:
        raise ExportError(
            f"GGUF export supports the llama architecture "
            f"({', '.join(sorted(LLAMA_ARCHITECTURES))}); this model is {archs[0]}. Export "
            "lora or merged_16bit instead",
            field="export_config.formats",
            code="gguf_unsupported_architecture",
        )
    return config


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 keeps rope_theta and scaling in rope_parameters; 4.x at the top level.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _add_hparams(writer: Any, config: dict[str, Any], hp: _Hparams, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != config["hidden_size"] // hp.n_heads:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):  # llama3 is the rope_freqs tensor
        raise ExportError(
            f"GGUF export does not write rope scaling {rope['rope_type']!r}",
            field="export_config.formats",
            code="gguf_unsupported_architecture",
        )


def _llama3_rope_factors(config: dict[str, Any], head_dim: int) -> Any:
    """Llama 3.1's frequency factors, as llama.cpp's converter writes them (rope_freqs)."""
    import numpy as np

    rope = _rope(config)
    base = float(rope["rope_theta"])
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _token_kind(token: str, special: bool) -> Any:
    import gguf

    looks_special = token.startswith("<|") and token.endswith("|>")
    return gguf.TokenType.CONTROL if special or looks_special else gguf.TokenType.USER_DEFINED


def _is_llama3_spec(spec: dict[str, Any]) -> bool:
    """Does tokenizer.json split and merge exactly as llama.cpp's llama-bpe does?"""
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None or model.get("type") != "BPE":
        return False
    if not model.get("ignore_merges") or model.get("byte_fallback") or model.get("dropout"):
        return False
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return False
    split, byte_level = steps
    return (
        split == _LLAMA3_SPLIT_STEP
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("add_prefix_space") is False
        and byte_level.get("use_regex") is False
    )


def _bpe_pre(tokenizer: Any, model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, as its converter finds it, or by spec."""
    digest = sha256(str(tokenizer.encode(_PRE_CHECK_TEXT)).encode()).hexdigest()
    pre = _KNOWN_BPE_PRE.get(digest)
    if pre is None and _is_llama3_spec(json.loads((model_dir / "tokenizer.json").read_text())):
        pre = "llama-bpe"
    if pre is None:
        raise ExportError(
            "GGUF export does not know this BPE tokenizer's pre-tokenizer (llama.cpp needs it "
            "named); export lora or merged_16bit instead",
            field="export_config.formats",
            code="gguf_unsupported_tokenizer",
        )
    return pre


def _add_bpe_vocab(writer: Any, tokenizer: Any, model_dir: Path, vocab_size: int) -> None:
    """A GPT-2 style byte-level BPE (SmolLM2, Llama 3): tokens, types, merges, pre-tokenizer."""
    import gguf

    pre = _bpe_pre(tokenizer, model_dir)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, kinds = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            kinds.append(_token_kind(added[i].content, added[i].special))
        else:
            tokens.append(by_id[i])
            kinds.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    merges = gguf.SpecialVocab(model_dir, load_merges=True).merges
    if not merges:
        raise ExportError(
            "the tokenizer has no BPE merges (tokenizer.json)",
            field="export_config.formats",
            code="gguf_unsupported_tokenizer",
        )
    writer.add_token_merges(merges)


SENTENCEPIECE_MODEL = "tokenizer.model"


def _add_sentencepiece_vocab(writer: Any, model_dir: Path) -> None:
    """A SentencePiece vocabulary (Llama 2, Mistral 7B): tokens, scores, types."""
    import gguf

    if not (model_dir / SENTENCEPIECE_MODEL).is_file():
        # Scores rebuilt from tokenizer.json make llama.cpp split words differently from
        # transformers ('Ibuprofen' came out as other pieces): refuse rather than ship that.
        raise ExportError(
            f"a SentencePiece tokenizer without its {SENTENCEPIECE_MODEL}: llama.cpp needs the "
            "model's own scores to tokenize as transformers does; put the base model's "
            f"{SENTENCEPIECE_MODEL} in its folder, or export lora or merged_16bit instead",
            field="export_config.formats",
            code="gguf_unsupported_tokenizer",
        )
    vocab: Any = gguf.SentencePieceVocab(model_dir)
    tokens, scores, kinds = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        kinds.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)


def _is_sentencepiece(model_dir: Path) -> bool:
    """SentencePiece (scores) or byte-level BPE (merges)? The pre-tokenizer tells."""
    if (model_dir / "tokenizer.model").is_file():
        return True
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if any(step.get("type") == "ByteLevel" for step in steps):
        return False  # GPT-2 style, even where a converter also set byte_fallback (SmolLM2)
    model = spec["model"]
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if _is_sentencepiece(model_dir):
        _add_sentencepiece_vocab(writer, model_dir)
    else:
        _add_bpe_vocab(writer, tokenizer, model_dir, vocab_size)
    if tokenizer.eos_token_id is None:
        raise ExportError(
            "the tokenizer has no eos token; set the end-of-turn token as eos",
            field="export_config.formats",
            code="gguf_unsupported_tokenizer",
        )
    # The eos llama.cpp stops on: the tokenizer's eos, the end-of-turn token of a chat model.
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    starts = tokenizer("a")["input_ids"][:1]
    writer.add_add_bos_token(bool(starts) and starts[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _permute(weights: Any, n_heads: int) -> Any:
    """HF's q/k rows (half-split rotary) -> llama.cpp's interleaved rotary layout."""
    return (
        weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tensors(model_dir: Path, hp: _Hparams) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """(GGUF name, shape, loader) for every weight; a tensor is read only when loaded."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layers)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(
            f"no safetensors weights in the merged folder {model_dir.name}",
            field="export_config.formats",
            code="artifact_missing",
        )
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        for key, shape in shapes.items():
            if key.endswith("rotary_emb.inv_freq"):
                continue
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ExportError(
                    f"GGUF export cannot place the tensor {key!r} in the llama layout",
                    field="export_config.formats",
                    code="gguf_unsupported_architecture",
                )

            def load(path: Path = path, key: str = key) -> Any:
                with safe_open(str(path), framework="pt") as handle:
                    data = handle.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute(data, hp.n_heads)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, hp.n_kv_heads)
                # As llama.cpp's converter: matrices in F16, norms and vectors in F32.
                return data.astype(np.float16 if data.ndim == 2 else np.float32)

            yield name, shape, load
    if _rope(hp.config)["rope_type"] == "llama3":
        factors = _llama3_rope_factors(hp.config, hp.head_dim)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield name, factors.shape, lambda: factors


def write_f16(model_dir: Path, target: Path, *, name: str) -> None:
    """Write the merged model in ``model_dir`` as an F16 GGUF at ``target`` (atomically)."""
    import gguf
    import numpy as np

    config = _read_config(model_dir)
    n_heads = config["num_attention_heads"]
    hp = _Hparams(
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        config=config,
    )
    tensors = list(_tensors(model_dir, hp))
    tmp = target.with_name(target.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_hparams(writer, config, hp, name)
        _add_tokenizer(writer, model_dir, config["vocab_size"])
        # Tensor infos first (shapes from the safetensors headers), then the data one by one:
        # only one tensor is in memory at a time, however big the model.
        for gguf_name, shape, _ in tensors:
            dtype = np.dtype(np.float16 if len(shape) == 2 else np.float32)
            writer.add_tensor_info(gguf_name, shape, dtype, math.prod(shape) * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, loader in tensors:
            writer.write_tensor_data(loader())
    finally:
        writer.close()
    os.replace(tmp, target)


def require_llama_cpp() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise ExportError(
            "GGUF export needs llama.cpp's library: pip install 'medtune[gguf]' on the worker",
            field="export_config.formats",
            code="gguf_requires_llama_cpp",
        )


_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def quantize(source: Path, target: Path, quant: str) -> None:
    """``source`` (F16 GGUF) -> ``target`` in ``quant``, by llama.cpp's own quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    tmp = target.with_name(target.name + ".tmp")
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(tmp).encode(), llama_cpp.byref(params)
    )
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"llama.cpp could not quantize to {quant} (status {status})",
            field="export_config.gguf_quantizations",
            code="gguf_quantize_failed",
        )
    os.replace(tmp, target)


def smoke_test(
    path: Path,
    model_dir: Path,
    *,
    system: str,
    questions: list[str],
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """Load ``path`` with llama.cpp and ask ``questions`` through its chat template (greedy).

    Fails with ``gguf_wrong_eos`` unless llama.cpp's eos is the tokenizer's end-of-turn token:
    with the wrong one, generation never stops where the model ends its turn.
    """
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    expected_eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=os.cpu_count(), seed=0, verbose=False)
    try:
        if llm.token_eos() != expected_eos:
            raise ExportError(
                f"the GGUF's eos is token {llm.token_eos()}, the model's end of turn is "
                f"{expected_eos}",
                field="export_config.formats",
                code="gguf_wrong_eos",
            )
        answers = []
        for question in questions:
            reply: Any = llm.create_chat_completion(
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                max_tokens=max_new_tokens,
                temperature=0.0,
            )
            choice = reply["choices"][0]
            answers.append(
                {
                    "question": question,
                    "answer": (choice["message"]["content"] or "").strip(),
                    "stopped": choice["finish_reason"] == "stop",
                    "finish_reason": choice["finish_reason"],
                    "tokens": reply["usage"]["completion_tokens"],
                }
            )
        return answers
    finally:
        llm.close()
