"""A training worker keeps its last base model between jobs (issue 13).

Loading the recipe's 8B base takes 25-47 s on an H200; a worker that serves several jobs on one
base loads it once. After a job the base is put back exactly as it was loaded: every module's
attributes (its children, so each LoRA wrapper gives way to the layer it wrapped; hooks, such as
the one gradient checkpointing adds to the embeddings; training flags; Unsloth's patched
forwards and its generation caches), its class, every parameter's ``requires_grad``, dtype and
attributes, and the configs. A checksum of every weight, taken at load and again after the
restore, proves nothing wrote into the base (a merged export, LoftQ or a trained bias would):
if it differs, the base is dropped and the next job loads a fresh one.

One base is kept per process (a GPU holds one), keyed by everything that changes the load; a job
on another base frees it before loading. ``release()`` frees it on demand.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseKey:
    """What makes two loads of a base the same model in memory."""

    engine: str  # "unsloth" or "transformers"
    path: str  # the resolved folder (or Hub id)
    revision: str | None
    load_in_4bit: bool  # as loaded: False where CUDA is missing
    dtype: str | None
    max_seq_length: int | None  # Unsloth sizes its rotary caches by it
    device: str


def _copied(value: Any) -> Any:
    # Containers are copied so that a later restore starts from the snapshot, not from what a
    # job appended to them; the objects inside are shared (they are the base's own).
    return copy.copy(value) if isinstance(value, dict | list | set) else value


def _checksums(model: Any) -> list[int]:
    """Per tensor, the sum of its bytes read as 32-bit words: any write into a weight changes it."""
    import torch

    sums = []
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            raw = tensor.detach().reshape(-1).view(torch.uint8)
            words = raw[: raw.numel() // 4 * 4].view(torch.int32)
            sums.append(torch.sum(words, dtype=torch.int64) + raw[words.numel() * 4 :].sum())
    if not sums:
        return []
    return [int(v) for v in torch.stack([s.to(sums[0].device) for s in sums]).tolist()]


class Snapshot:
    """The freshly loaded base's state, to put back after a job (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.modules = [
            (m, type(m), {k: _copied(v) for k, v in vars(m).items()}) for m in model.modules()
        ]
        self.params = [
            (p, p.requires_grad, p.dtype, {k: _copied(v) for k, v in vars(p).items()})
            for p in model.parameters()
        ]
        self.configs = [
            (c, copy.deepcopy(vars(c)))
            for c in {
                id(c): c
                for m in model.modules()
                for c in (getattr(m, "config", None), getattr(m, "generation_config", None))
                if c is not None and hasattr(c, "__dict__")
            }.values()
        ]
        self.module_ids = {id(m) for m, _, _ in self.modules}
        self.had_peft_config = hasattr(model, "peft_config")
        self.checksums = _checksums(model)

    def restore(self) -> str | None:
        """Put the base back; returns why it cannot be reused (None: it is as loaded)."""
        for module, cls, saved in self.modules:
            if type(module) is not cls:
                module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update({k: _copied(v) for k, v in saved.items()})
        for param, requires_grad, dtype, saved in self.params:
            param.__dict__.clear()
            param.__dict__.update({k: _copied(v) for k, v in saved.items()})
            param.grad = None
            if param.dtype != dtype:  # upcast for training (bf16 -> fp32 -> bf16 is exact)
                param.data = param.data.to(dtype)
            param.requires_grad_(requires_grad)
        for config, saved in self.configs:
            config.__dict__.clear()
            config.__dict__.update(copy.deepcopy(saved))
        return self.check()

    def check(self) -> str | None:
        leftovers = [n for n, m in self.model.named_modules() if id(m) not in self.module_ids]
        if leftovers:
            return f"modules the job added are left in the base ({leftovers[0]})"
        if hasattr(self.model, "peft_config") and not self.had_peft_config:
            return "peft_config left on the base"
        if _checksums(self.model) != self.checksums:
            return "the base weights changed during the job (a merge, LoftQ or a trained bias)"
        return None


@dataclass
class Kept:
    """A loaded base and what puts it back: the snapshot, and its tokenizer as loaded."""

    key: BaseKey
    model: Any
    tokenizer: Any  # as loaded; each job gets a copy (a job may set its chat template)
    snapshot: Snapshot
    notes: list[str] = field(default_factory=list)
    loaded_tokenizer: Any = None  # the object the model (Unsloth's patches) refers to as loaded

    @classmethod
    def of(cls, key: BaseKey, model: Any, tokenizer: Any, notes: list[str]) -> Kept | None:
        """The base to keep; None (the job runs, its base is not kept) if it cannot be
        snapshotted."""
        try:
            pristine = copy.deepcopy(tokenizer)
            return cls(key, model, pristine, Snapshot(model), list(notes), tokenizer)
        except Exception as exc:
            log.warning("base model %s will not be kept: %s: %s", key.path, type(exc).__name__, exc)
            return None

    def job_tokenizer(self) -> Any:
        """A fresh copy of the tokenizer as loaded, also where the model refers to it."""
        tokenizer = copy.deepcopy(self.tokenizer)
        for module in self.model.modules():
            for name, value in list(vars(module).items()):
                # Unsloth's _saved_temp_tokenizer; the restore put the loaded one back.
                if value is self.loaded_tokenizer:
                    setattr(module, name, tokenizer)
        return tokenizer


_lock = threading.Lock()
_kept: Kept | None = None


def take(key: BaseKey) -> Kept | None:
    """The kept base for ``key`` (no longer kept while a job uses it); any other is freed."""
    global _kept
    with _lock:
        kept, _kept = _kept, None
    if kept is not None and kept.key == key:
        return kept
    if kept is not None:
        log.info("base model %s released: the next job trains %s", kept.key.path, key.path)
        del kept
        free_memory()
    return None


def give_back(kept: Kept) -> bool:
    """Restore the base after a job and keep it for the next; False if it was dropped."""
    global _kept
    try:
        problem = kept.snapshot.restore()
    except Exception as exc:  # a model the restore does not understand: never reuse it
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        log.warning("base model %s not kept for the next job: %s", kept.key.path, problem)
        return False
    with _lock:
        _kept = kept
    log.info("base model %s kept for the next job on it", kept.key.path)
    return True


def release(reason: str = "asked") -> bool:
    """Free the kept base (memory is needed elsewhere); False if none was kept."""
    global _kept
    with _lock:
        kept, _kept = _kept, None
    if kept is None:
        return False
    log.info("base model %s released (%s)", kept.key.path, reason)
    del kept
    free_memory()
    return True


def kept_key() -> BaseKey | None:
    with _lock:
        return _kept.key if _kept is not None else None


def free_memory() -> None:
    """Collect what a finished job left (its trainer and callback refer to each other, so its
    LoRA weights and optimizer state wait for the cycle collector) and return CUDA's cache."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
