"""Model loading per engine: transformers + peft (+ bitsandbytes on CUDA), or Unsloth on CUDA.

Unsloth patches transformers when imported, so it is imported only inside the Unsloth path:
the API and CPU workers never load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.base_models import hub_call
from core.errors import SpecError
from core.spec import JobSpec


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    engine: str
    notes: list[str] = field(default_factory=list)


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


def compute_dtype(spec: JobSpec) -> Any:
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    if spec.model.dtype:
        return getattr(torch, spec.model.dtype)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load(spec: JobSpec, model_path: str, *, init_adapter: str | None = None) -> Loaded:
    """The base with a trainable LoRA adapter: fresh, or ``init_adapter``'s weights (a folder
    saved by an earlier job) to continue from."""
    import torch

    check_loftq(spec, cuda=torch.cuda.is_available())
    engine = pick_engine(spec)
    if engine == "unsloth":
        loaded = _load_unsloth(spec, model_path, init_adapter)
    else:
        loaded = _load_transformers(spec, model_path, init_adapter)
    if init_adapter:
        loaded.notes.append(f"started from the adapter of job {spec.model.init_adapter}")
    return loaded


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


def _load_transformers(spec: JobSpec, model_path: str, init_adapter: str | None) -> Loaded:
    import torch
    from peft import (
        LoftQConfig,
        LoraConfig,
        PeftModel,
        get_peft_model,
        prepare_model_for_kbit_training,
    )
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
    checkpointing = bool(spec.lora.use_gradient_checkpointing)
    if quantized:
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
    )
    try:
        if init_adapter:  # the earlier job's weights, trainable, instead of a fresh adapter
            model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        else:
            model = get_peft_model(model, config)
    except (ValueError, TypeError) as exc:
        raise _lora_error(exc) from exc
    return Loaded(model, tokenizer, "transformers+peft" + ("+bnb4bit" if quantized else ""), notes)


def _load_unsloth(spec: JobSpec, model_path: str, init_adapter: str | None) -> Loaded:
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
        )
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise _lora_error(exc) from exc
    if init_adapter:
        _load_adapter_weights(model, init_adapter)
    return Loaded(model, tokenizer, "unsloth")


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
