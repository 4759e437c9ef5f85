"""GPU paths of the inference engine; imported only when CUDA is present.

- Adapters: the base is loaded with Unsloth's ``FastLanguageModel`` (4-bit when the job trained
  in 4-bit) and switched to ``for_inference`` (Unsloth's fused LoRA/RoPE kernels and its own KV
  cache), with peft adapters attached as on the CPU. Without Unsloth: transformers in bfloat16.
- Merged weights (a job's ``merged_16bit`` export): bfloat16, a static KV cache and a
  one-token step replayed as a CUDA graph by medtune's own loop
  (core/inference/static_decode.py), which removes the per-token Python and kernel-launch
  overhead that bounds eager decoding of a single stream. ``generate_kwargs()`` keeps
  transformers' own route to the same idea (``cache_implementation="static"`` plus a
  ``CompileConfig``) for comparison in the benchmark.
"""

from __future__ import annotations

import logging
from typing import Any

from core.inference.generate import Generation, GenerationRequest

log = logging.getLogger(__name__)

# Every compiled graph is specialised to the cache length: one size for all requests.
STATIC_CACHE_TOKENS = 4096


def unsloth_available() -> bool:
    try:
        import unsloth  # noqa: F401
    except ImportError:
        return False
    return True


def load_base(
    path: str, *, load_in_4bit: bool, max_seq_length: int = 4096, unsloth: bool | None = None
) -> tuple[Any, Any]:
    """The base model for adapters: Unsloth ``for_inference`` where installed.

    ``unsloth=False`` keeps to transformers (+ bitsandbytes): importing Unsloth patches
    transformers for the whole process, so a comparison must not even try it.
    """
    import torch

    if unsloth if unsloth is not None else unsloth_available():
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=max_seq_length,
            dtype=torch.bfloat16,
            load_in_4bit=load_in_4bit,
        )
        FastLanguageModel.for_inference(model)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant: dict[str, Any] = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        quant["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map={"": 0}, **quant
    )
    return model.eval(), AutoTokenizer.from_pretrained(path)


def attach_adapter(model: Any, adapter_dir: str, name: str, *, unsloth: bool | None = None) -> Any:
    """Attach a LoRA adapter; the returned model is the one to keep (a PeftModel)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(adapter_dir, adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=name)
    if unsloth if unsloth is not None else unsloth_available():
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)  # re-patch the LoRA layers peft just added
    return model.eval()


def restore_stock_rotary(model: Any) -> bool:
    """Give a plain transformers model back its own rotary embedding if Unsloth swapped it.

    Once Unsloth has loaded a Llama in this process it has replaced transformers' rotary
    embedding class with its own (its other patches are gated to models it loaded), so a plain
    model built later gets Unsloth's, whose forward reads a position back to the host
    (``int(position_ids.max())``): a single CUDA graph cannot capture that step. The stock
    class is taken from a fresh import of the model's own modeling file, which Unsloth's
    module-level swap does not reach. Returns whether anything was replaced.
    """
    import importlib.util

    from torch import nn

    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    home = type(model).__module__
    if rotary is None or type(rotary).__module__ == home:
        return False
    spec = importlib.util.find_spec(home)
    if spec is None or spec.loader is None:
        return False
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    candidates = {
        name: value
        for name, value in vars(fresh).items()
        if name.endswith("RotaryEmbedding")
        and isinstance(value, type)
        and issubclass(value, nn.Module)
        and value.__module__ == home
    }
    stock = candidates.get(type(rotary).__name__)
    if stock is None and len(candidates) == 1:
        (stock,) = candidates.values()
    if stock is None:
        log.warning("no stock rotary embedding found in %s; keeping %s", home, type(rotary))
        return False
    device = next(model.parameters()).device
    inner.rotary_emb = stock(config=model.config).to(device)
    return True


class StaticCompiled:
    """A merged model decoding through a static KV cache and a CUDA-graph-compiled step."""

    def __init__(self, path: str, *, max_cache_tokens: int = STATIC_CACHE_TOKENS) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from core.inference.static_decode import StaticDecoder

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map={"": 0}
        ).eval()
        if restore_stock_rotary(self.model):
            log.info("static path: Unsloth's rotary embedding replaced by the stock one")
        self.max_cache_tokens = max_cache_tokens
        self.decoder = StaticDecoder(
            self.model, self.tokenizer, max_cache_tokens=max_cache_tokens, compile=True
        )

    def generate(self, request: GenerationRequest) -> Generation:
        return self.decoder.generate(request)

    def generate_kwargs(self) -> dict[str, Any]:
        """transformers' ``generate()`` over a static cache with a compiled forward."""
        from transformers import CompileConfig

        return {
            "cache_implementation": "static",
            # One cache size for every request: graphs are recorded once, not per prompt length.
            "max_cache_len": self.max_cache_tokens,
            "compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead", dynamic=False),
        }

    def warm_up(self) -> None:
        """Compile and record the graphs before the first real request (tens of seconds)."""
        for _ in range(2):
            self.generate(
                GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=8)
            )
