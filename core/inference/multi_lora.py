"""Several LoRA adapters of one base in one batch, each row its own (issue #14, multi-LoRA).

peft's mixed-adapter batch (``adapter_names``) loops over the adapters in Python and Unsloth's
fast LoRA kernels ignore it; LoRAX and vLLM instead gather each row's adapter weights from a
stack and apply them with batched matrix products. ``inject`` does that to a plain transformers
model (bf16, or 4-bit bitsandbytes): every targeted Linear becomes a ``BatchedLoraLinear`` that
keeps its base layer and a stack of ``slots`` adapters, ``A`` [slots, rank, in], ``B``
[slots, out, rank] and ``scale`` [slots], plus one per-row index shared by every layer::

    y = base(x) + ((x @ A[idx]^T) @ B[idx]^T) * scale[idx]      (idx -1: the base alone)

The stacks and the index are buffers whose storage never changes: loading an adapter copies its
weights into a slot, choosing a row's adapter writes the index, so a compiled step replayed as a
CUDA graph reads new adapters without being traced or recorded again. A smaller rank is padded
with zeros (the padded columns add nothing). ``LoraSlots`` keeps which adapter is in which slot,
least recently used out, never one a running batch uses.

An adapter fits only if it is a plain LoRA of rank <= ``rank`` on targeted Linears (no DoRA, no
modules_to_save, no per-module rank or alpha); ``why_not`` says why one does not.
"""

from __future__ import annotations

import json
import math
from collections import Counter, OrderedDict
from collections.abc import Collection
from pathlib import Path
from typing import Any

from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."  # where peft saves an adapter's keys from


class BatchedLoraLinear(nn.Module):
    """A Linear (or bitsandbytes Linear4bit) plus one LoRA delta per row, from a stack."""

    def __init__(self, base: nn.Linear, *, slots: int, rank: int, index: Any, dtype: Any) -> None:
        import torch

        super().__init__()
        self.base_layer = base
        device = index.device
        self.register_buffer(
            "lora_A", torch.zeros(slots, rank, base.in_features, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_B", torch.zeros(slots, base.out_features, rank, dtype=dtype, device=device)
        )
        self.register_buffer("scale", torch.zeros(slots, dtype=dtype, device=device))
        self.register_buffer("index", index, persistent=False)  # one tensor for every layer

    def forward(self, x: Any) -> Any:
        import torch

        result = self.base_layer(x)
        idx = self.index.clamp(min=0)
        # Row b of the batch uses slot index[b]; -1 scales its delta to zero (the base alone).
        scale = torch.where(self.index >= 0, self.scale[idx], torch.zeros_like(self.scale[idx]))
        xa = torch.bmm(x.to(self.lora_A.dtype), self.lora_A[idx].transpose(1, 2))
        delta = torch.bmm(xa, self.lora_B[idx].transpose(1, 2)) * scale[:, None, None]
        return result + delta.to(result.dtype)

    def load(self, slot: int, a: Any | None, b: Any | None, scale: float) -> None:
        """Copy one adapter's weights into ``slot`` in place (zeros where it has none here)."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if a is None or b is None:
            self.scale[slot] = 0.0
            return
        r = a.shape[0]
        self.lora_A[slot, :r].copy_(a)
        self.lora_B[slot, :, :r].copy_(b)
        self.scale[slot] = scale


def inject(
    model: Any, *, slots: int, rank: int, rows: int, targets: tuple[str, ...] = PROJECTIONS
) -> tuple[dict[str, BatchedLoraLinear], Any]:
    """Replace ``model``'s targeted Linears by ``BatchedLoraLinear`` modules; returns them by
    name (as peft names them, less its prefix) and the shared per-row index ([rows], -1)."""
    import torch

    embed = model.get_input_embeddings().weight
    index = torch.full((rows,), -1, dtype=torch.long, device=embed.device)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        raise ValueError(f"no Linear named {', '.join(targets)} to put LoRA slots on")
    layers: dict[str, BatchedLoraLinear] = {}
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = BatchedLoraLinear(module, slots=slots, rank=rank, index=index, dtype=embed.dtype)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers, index


def adapter_scale(config: dict[str, Any]) -> float:
    """peft's scaling: lora_alpha / r, or / sqrt(r) with rsLoRA."""
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: str) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """An adapter's config and its (A, B) per module name (peft's names, less its prefix)."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                name = key.split(marker)[0].removeprefix(_PREFIX)
                pairs.setdefault(name, {})[part] = value
    weights = {name: (p.get("lora_A"), p.get("lora_B")) for name, p in pairs.items()}
    return config, weights


def why_not(
    config: dict[str, Any], weights: dict[str, tuple[Any, Any]], *, layers: set[str], rank: int
) -> str | None:
    """None if the adapter fits the slots; else why not, in words."""
    if config.get("peft_type") != "LORA":
        return "not a LoRA adapter"
    for option in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(option):
            return f"{option} is not supported by the batched LoRA"
    for option in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if config.get(option):
            return f"{option} is not supported by the batched LoRA"
    if int(config.get("r", 0)) > rank:
        return f"rank {config.get('r')} is above the slots' rank {rank}"
    other = sorted(name for name in weights if name not in layers)
    if other:
        return f"LoRA on modules without slots: {', '.join(other[:3])}"
    if any(a is None or b is None for a, b in weights.values()):
        return "a module has lora_A or lora_B missing"
    return None


class LoraSlots:
    """Which adapter is in which slot of a model's stacks, least recently used first out."""

    def __init__(
        self, layers: dict[str, BatchedLoraLinear], index: Any, *, loads: Counter[str] | None = None
    ) -> None:
        first = next(iter(layers.values()))
        self.layers = layers
        self.index = index
        self.slots = int(first.lora_A.shape[0])
        self.rank = int(first.lora_A.shape[1])
        self.loads = loads if loads is not None else Counter()
        self._held: OrderedDict[str, int] = OrderedDict()  # adapter folder -> slot

    def check(self, adapter_dir: str) -> str | None:
        """None if the adapter can go in a slot; else why not."""
        try:
            config, weights = read_adapter(adapter_dir)
        except (OSError, ValueError) as exc:
            return f"unreadable adapter: {exc}"[:200]
        return why_not(config, weights, layers=set(self.layers), rank=self.rank)

    def slot(self, adapter_dir: str, *, in_use: Collection[str] = ()) -> int:
        """The slot holding ``adapter_dir``, loading it into the least recently used slot not
        ``in_use`` (another row of the batch being set up) when it is not held."""
        if adapter_dir in self._held:
            self._held.move_to_end(adapter_dir)
            return self._held[adapter_dir]
        config, weights = read_adapter(adapter_dir)
        why = why_not(config, weights, layers=set(self.layers), rank=self.rank)
        if why is not None:
            raise ValueError(f"{adapter_dir}: {why}")
        taken = set(self._held.values())
        free = [s for s in range(self.slots) if s not in taken]
        if free:
            slot = free[0]
        else:
            victim = next((a for a in self._held if a not in in_use), None)
            if victim is None:
                raise ValueError(f"all {self.slots} LoRA slots are used by this batch")
            slot = self._held.pop(victim)
            self.loads["slot_evicted"] += 1
        scale = adapter_scale(config)
        for name, layer in self.layers.items():
            a, b = weights.get(name, (None, None))
            layer.load(slot, a, b, scale)
        self._held[adapter_dir] = slot
        self.loads["slot"] += 1
        return slot

    def held(self) -> list[str]:
        """The adapters in slots, least recently used first."""
        return list(self._held)

    def set_rows(self, slots: list[int | None]) -> None:
        """Row b answers with slot ``slots[b]`` (None: the base); rows beyond are idle (-1)."""
        import torch

        values = [-1 if s is None else s for s in slots]
        values += [-1] * (int(self.index.shape[0]) - len(values))
        self.index.copy_(torch.tensor(values, dtype=torch.long))
