"""Answer questions with a base model and, optionally, a job's LoRA adapter.

One long-lived engine per worker process keeps each base model loaded once and an LRU of
adapters attached to it (peft multi-adapter), so a second question to a job reloads nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.base_models import hub_call, resolve
from core.data.tokenize import ensure_chat_template, render
from core.errors import MedtuneError

log = logging.getLogger(__name__)


class AdapterMissing(MedtuneError):
    code = "adapter_missing"
    status = 409


@dataclass
class _Base:
    model: Any  # a PeftModel once an adapter is attached
    tokenizer: Any
    adapters: OrderedDict[str, None]


class InferenceEngine:
    def __init__(self, *, models_dir: Path, max_adapters: int = 8) -> None:
        self.models_dir = models_dir
        self.max_adapters = max_adapters
        self.loads: Counter[str] = Counter()  # how often a base or an adapter was loaded
        self._bases: dict[str, _Base] = {}

    def _base(self, name: str) -> _Base:
        path = resolve(name, models_dir=self.models_dir)
        if path not in self._bases:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            cuda = torch.cuda.is_available()
            tokenizer = hub_call(name, AutoTokenizer.from_pretrained, path)
            ensure_chat_template(tokenizer)
            model = hub_call(
                name,
                AutoModelForCausalLM.from_pretrained,
                path,
                dtype=torch.bfloat16 if cuda else torch.float32,
            )
            model = model.to("cuda" if cuda else "cpu").eval()
            self._bases[path] = _Base(model, tokenizer, OrderedDict())
            self.loads["base"] += 1
        return self._bases[path]

    def _activate(self, base: _Base, adapter_dir: str, name: str) -> None:
        from peft import PeftModel

        if name in base.adapters:
            base.adapters.move_to_end(name)
        else:
            if not (Path(adapter_dir) / "adapter_config.json").is_file():
                raise AdapterMissing(
                    f"the adapter of {name} is missing or incomplete on the server",
                    field="job_id",
                )
            if isinstance(base.model, PeftModel):
                base.model.load_adapter(adapter_dir, adapter_name=name)
            else:
                base.model = PeftModel.from_pretrained(base.model, adapter_dir, adapter_name=name)
            base.model.eval()
            base.adapters[name] = None
            self.loads["adapter"] += 1
            if len(base.adapters) > self.max_adapters:
                oldest, _ = base.adapters.popitem(last=False)
                base.model.set_adapter(name)
                base.model.delete_adapter(oldest)
        base.model.set_adapter(name)

    def answer(
        self,
        *,
        base_model: str,
        messages: list[dict[str, str]],
        adapter_dir: str | None = None,
        adapter_name: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> dict[str, Any]:
        import torch

        base = self._base(base_model)
        if adapter_dir:
            self._activate(base, adapter_dir, adapter_name or adapter_dir)
        tok = base.tokenizer
        text = render(tok, messages, add_generation_prompt=True)
        inputs = tok(text, add_special_tokens=False, return_tensors="pt").to(base.model.device)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if (temperature > 0)
            else {"do_sample": False}
        )
        started = time.perf_counter()
        use_base = adapter_dir is None and hasattr(base.model, "disable_adapter")
        with torch.inference_mode(), base.model.disable_adapter() if use_base else nullcontext():
            out = base.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                **sampling,
            )
        seconds = time.perf_counter() - started
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        stopped = bool(new) and new[-1] == tok.eos_token_id
        return {
            "answer": tok.decode(new, skip_special_tokens=True).strip(),
            "finish_reason": "stop" if stopped else "length",
            "usage": {
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "completion_tokens": len(new),
            },
            "generation_seconds": round(seconds, 4),
            "tokens_per_second": round(len(new) / seconds, 2) if seconds > 0 else None,
        }
