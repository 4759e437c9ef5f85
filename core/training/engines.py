"""Model loading per engine: transformers + peft (+ bitsandbytes on CUDA), or Unsloth on CUDA.

Unsloth patches transformers when imported, so it is imported only inside the Unsloth path:
the API and CPU workers never load it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.base_models import hub_call
from core.errors import SpecError
from core.memory import shape_of
from core.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    engine: str
    notes: list[str] = field(default_factory=list)
    kept: Any = None  # base_cache.Kept: the base to put back for the next job (load(keep=True))
    checkpointing: bool | str | None = None  # as trained (core.training.checkpointing)
    step_tokens: int | None = None  # the job's fullest step, where it was asked for


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_engine(spec: JobSpec) -> str:
    choice = spec.training.engine
    if choice == "auto":
        return "unsloth" if cuda_available() else "transformers"
    if choice == "unsloth" and not cuda_available():
        raise SpecError(
            "training_config.engine 'unsloth' needs a CUDA GPU and this worker has none; use "
            "'auto' or 'transformers'",
            field="training_config.engine",
            code="engine_unavailable",
        )
    return choice


def loaded_name(engine: str, *, load_in_4bit: bool = False) -> str:
    """The engine a ``Loaded`` names (the job's ``engine``; exports read "bnb4bit" in it):
    "unsloth", or what transformers stacks, peft and bitsandbytes for a 4-bit base."""
    if engine == "unsloth":
        return "unsloth"
    return "transformers+peft+bnb4bit" if load_in_4bit else "transformers+peft"


def compute_dtype(spec: JobSpec) -> Any:
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    if spec.model.dtype:
        return getattr(torch, spec.model.dtype)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load(
    spec: JobSpec,
    model_path: str,
    *,
    init_adapter: str | None = None,
    keep: bool = False,
    skip_checkpointing: bool = False,
    step_tokens: Callable[[], int | None] | None = None,
) -> Loaded:
    """The base with a trainable LoRA adapter: fresh, or ``init_adapter``'s weights (a folder
    saved by an earlier job) to continue from.

    ``keep`` (a training worker): reuse the base a previous job of this process left on the
    same base (``core.training.base_cache``) instead of loading it, and make the base of this
    job reusable; the caller hands it back with :func:`give_back` when the job is over.
    ``skip_checkpointing``: train without gradient checkpointing where the card holds the job
    without it (``core.training.checkpointing``); ``step_tokens`` gives the job's fullest step
    once its data is prepared (it may wait for it), else the spec's most is assumed.
    """
    import time

    import torch

    from core.training import base_cache, checkpointing

    check_loftq(spec, cuda=torch.cuda.is_available())
    engine = pick_engine(spec)
    key = base_key(spec, model_path, engine)
    started = time.monotonic()
    kept = base_cache.take(key) if keep else None
    reused = kept is not None
    if kept is not None:
        base, tokenizer = kept.model, kept.job_tokenizer()
        notes = [
            *kept.notes,
            "base model reused: this worker kept it loaded after its previous job on it",
        ]
        log.info("base model %s reused from the previous job (not loaded again)", model_path)
    else:
        loader = _base_unsloth if engine == "unsloth" else _base_transformers
        base, tokenizer, notes = loader(spec, model_path)
        if keep and keepable(spec, engine):
            kept = base_cache.Kept.of(key, base, tokenizer, notes)
    based = time.monotonic()
    try:
        free = checkpointing.free_cuda_bytes() if skip_checkpointing else None
        tokens = step_tokens() if step_tokens is not None and free is not None else None
        shape = shape_of(getattr(base, "config", None))
        ckpt, why = checkpointing.choose(spec, shape, engine=engine, free_bytes=free, tokens=tokens)
        notes = [*notes, why] if why else notes
        run_spec = checkpointing.with_checkpointing(spec, ckpt)
        if engine == "unsloth":
            model = _adapter_unsloth(run_spec, base, init_adapter)
        else:
            model = _adapter_transformers(run_spec, base, init_adapter)
    except BaseException:
        if kept is not None:
            base_cache.give_back(kept)
        raise
    log.info(
        "model ready in %.1f s (base %s in %.1f s, adapter %.1f s)",
        time.monotonic() - started,
        "reused" if reused else "loaded",
        based - started,
        time.monotonic() - based,
    )
    name = loaded_name(engine, load_in_4bit=key.load_in_4bit)
    loaded = Loaded(model, tokenizer, name, notes, kept=kept, checkpointing=ckpt)
    loaded.step_tokens = tokens
    if init_adapter:
        loaded.notes.append(f"started from the adapter of job {spec.model.init_adapter}")
    return loaded


def base_key(spec: JobSpec, model_path: str, engine: str) -> Any:
    """Everything that changes what loading ``model_path`` for ``spec`` puts in memory."""
    import torch

    from core.training.base_cache import BaseKey

    cuda = torch.cuda.is_available()
    return BaseKey(
        engine=engine,
        path=model_path,
        revision=spec.model.revision,
        load_in_4bit=spec.model.load_in_4bit and cuda,
        dtype=str(compute_dtype(spec)),
        max_seq_length=spec.model.max_seq_length if engine == "unsloth" else None,
        device="cuda" if cuda else "cpu",
    )


def keepable(spec: JobSpec, engine: str) -> bool:
    """Whether a job leaves its base as it found it: LoftQ rewrites the base weights, a trained
    bias is a base weight, peft's merge (a merged export) folds LoRA into the base, and
    modules_to_save wraps the base's embeddings and head (and re-ties them). The base's checksum
    catches anything else that writes into it."""
    merges = any(f != "lora" for f in spec.export.formats) and engine != "unsloth"
    lora = spec.lora
    return (
        lora.loftq_config is None
        and lora.bias == "none"
        and not lora.modules_to_save
        and not merges
    )


def reload_into(loaded: Loaded, load: Callable[[], Loaded]) -> None:
    """Put a fresh adapter on ``loaded``'s base in place (its base handed back and taken again
    when kept): e.g. with gradient checkpointing after an out-of-memory without it. The job's
    tokenizer (its chat template set) stays; whoever holds ``loaded`` holds the new model."""
    give_back(loaded)
    fresh = load()
    loaded.model, loaded.kept = fresh.model, fresh.kept
    loaded.checkpointing, loaded.step_tokens = fresh.checkpointing, fresh.step_tokens


def give_back(loaded: Loaded) -> None:
    """After a job: put its base back for the next job (if it was loaded to be kept), and free
    the adapter, its optimizer state and whatever else the job held."""
    from core.training import base_cache

    kept, loaded.kept, loaded.model = loaded.kept, None, None
    if kept is not None:
        base_cache.give_back(kept)
    base_cache.free_memory()


def _lora_error(exc: Exception) -> SpecError:
    return SpecError(
        f"LoRA could not be applied: {str(exc)[:300]}",
        field="lora_config.target_modules",
        code="lora_config_invalid",
    )


def check_loftq(spec: JobSpec, *, cuda: bool) -> None:
    """LoftQ quantises with bitsandbytes on CUDA only (peft's loftq_init): refuse it elsewhere
    before the model loads, instead of an internal error half-way through."""
    if spec.lora.loftq_config is not None and not cuda:
        raise SpecError(
            "loftq_config needs a CUDA worker: peft's LoftQ quantises the base with bitsandbytes "
            "on the GPU; remove loftq_config (LoRA then starts at zero) or run on a GPU worker",
            field="lora_config.loftq_config",
            code="loftq_needs_cuda",
        )


def _base_transformers(spec: JobSpec, model_path: str) -> tuple[Any, Any, list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    notes: list[str] = []
    cuda = torch.cuda.is_available()
    dtype = compute_dtype(spec)
    kwargs: dict[str, Any] = {"dtype": dtype}
    quantized = spec.model.load_in_4bit and cuda
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0}
    elif spec.model.load_in_4bit:
        notes.append("load_in_4bit needs CUDA (bitsandbytes): the base was loaded in float32")
    revision = spec.model.revision  # from_pretrained ignores it for a local folder
    tokenizer = hub_call(
        spec.model.base_model, AutoTokenizer.from_pretrained, model_path, revision=revision
    )
    model = hub_call(
        spec.model.base_model,
        AutoModelForCausalLM.from_pretrained,
        model_path,
        revision=revision,
        **kwargs,
    )
    if cuda and not quantized:
        model = model.to("cuda")
    return model, tokenizer, notes


def _adapter_transformers(spec: JobSpec, model: Any, init_adapter: str | None) -> Any:
    import torch
    from peft import (
        LoftQConfig,
        LoraConfig,
        PeftModel,
        get_peft_model,
        prepare_model_for_kbit_training,
    )
    from transformers import set_seed

    if spec.model.load_in_4bit and torch.cuda.is_available():  # quantized by _base_transformers
        checkpointing = bool(spec.lora.use_gradient_checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    lora = spec.lora
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights="loftq" if lora.loftq_config else True,
        loftq_config=LoftQConfig(**lora.loftq_config.model_dump()) if lora.loftq_config else {},
        # Tied embeddings (SmolLM2) keep one trained copy for both modules.
        modules_to_save=list(lora.modules_to_save) or None,
        ensure_weight_tying=bool(lora.modules_to_save),
    )
    # The adapter's initial weights follow the job's seed (as Unsloth's random_state does), so
    # a job starts the same whether its base was loaded now or kept from an earlier job.
    set_seed(spec.training.seed)
    try:
        if init_adapter:  # the earlier job's weights, trainable, instead of a fresh adapter
            return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        return get_peft_model(model, config)
    except (ValueError, TypeError) as exc:
        raise _lora_error(exc) from exc


def _base_unsloth(spec: JobSpec, model_path: str) -> tuple[Any, Any, list[str]]:
    import torch
    from unsloth import FastLanguageModel

    model, tokenizer = hub_call(
        spec.model.base_model,
        FastLanguageModel.from_pretrained,
        model_name=model_path,
        max_seq_length=spec.model.max_seq_length,
        dtype=getattr(torch, spec.model.dtype) if spec.model.dtype else None,
        load_in_4bit=spec.model.load_in_4bit,
        **({"revision": spec.model.revision} if spec.model.revision else {}),
    )
    return model, tokenizer, []


def _adapter_unsloth(spec: JobSpec, model: Any, init_adapter: str | None) -> Any:
    """Unsloth's peft model on a plain base (a kept base is plain again, its modules as loaded:
    on a model that is still a PeftModel, get_peft_model would keep that adapter)."""
    from unsloth import FastLanguageModel

    lora = spec.lora
    try:
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            target_modules=lora.target_modules,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            bias=lora.bias,
            use_gradient_checkpointing=lora.use_gradient_checkpointing,
            random_state=spec.training.seed,
            use_rslora=lora.use_rslora,
            # Without init_lora_weights="loftq" a loftq_config does nothing in Unsloth either.
            init_lora_weights="loftq" if lora.loftq_config else True,
            loftq_config=lora.loftq_config.model_dump() if lora.loftq_config else {},
            max_seq_length=spec.model.max_seq_length,
            **({"use_dora": True} if lora.use_dora else {}),
            **({"modules_to_save": list(lora.modules_to_save)} if lora.modules_to_save else {}),
        )
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise _lora_error(exc) from exc
    if init_adapter:
        _load_adapter_weights(model, init_adapter)
    return model


def _load_adapter_weights(model: Any, folder: str) -> None:
    """Unsloth builds its own peft model (same shape: checked at submit); the earlier job's
    LoRA weights are then copied into it. Every saved tensor must land somewhere."""
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(folder) / "adapter_model.safetensors"
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    if getattr(result, "unexpected_keys", None):
        raise SpecError(
            f"the adapter to continue from does not fit this model ({result.unexpected_keys[:3]})",
            field="model_config.init_adapter",
            code="init_adapter_lora_mismatch",
        )
