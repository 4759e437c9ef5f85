"""Estimate a job's peak GPU memory from its spec, before any GPU is touched.

The model is read from config.json (a local folder or the embedded model) or, for Hub ids
that cannot be fetched here, from the reference shapes of the families the service targets.
The formula's constants are calibrated on the H200 measurements in BENCHMARKS.md (QLoRA,
r=16 on all 7 projections, gradient checkpointing, AdamW 8-bit, 2 x 2048 tokens): Unsloth
Llama-3-8B 6.79 GiB, Mistral-7B 5.33 GiB, Llama-3.2-1B 1.68 GiB; transformers + peft +
bitsandbytes Llama-3-8B 16.49 GiB, 1B 8.47 GiB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.spec import JobSpec

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        h, kv, i = self.hidden_size, self.kv_size, self.intermediate_size
        q_out = self.hidden_size  # q and o are hidden x hidden in these families
        return {
            "q_proj": (h, q_out),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q_out, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


# Reference shapes (from each model's published config.json), for Hub ids we cannot read here.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape(128256, 4096, 14336, 32, 32, 8),
    "llama-3.1-8b": ModelShape(128256, 4096, 14336, 32, 32, 8),
    "mistral-7b": ModelShape(32000, 4096, 14336, 32, 32, 8),
    "gemma-1.1-7b": ModelShape(256000, 3072, 24576, 28, 16, 16, tie_word_embeddings=True),
    "gemma-7b": ModelShape(256000, 3072, 24576, 28, 16, 16, tie_word_embeddings=True),
    "llama-2-7b": ModelShape(32000, 4096, 11008, 32, 32, 32),
    "llama-3.2-1b": ModelShape(128256, 2048, 8192, 16, 32, 8, tie_word_embeddings=True),
}

# Calibration constants (bytes), fitted to the measurements named in the module docstring.
_UNSLOTH_ACT_PER_TOKEN_HIDDEN = 70  # checkpointed, offloaded hidden states + one live layer
_HF_ACT_PER_TOKEN_HIDDEN = 250  # checkpointed hidden states, recompute buffers
_HF_LOGIT_BYTES = 12  # bf16 logits + fp32 upcast + their gradient, per token x vocab
_NF4_BYTES = 0.5 + 0.07  # 4-bit weights plus double-quantised absmax and bookkeeping
# Without checkpointing, per token and layer: the bf16 tensors a decoder layer's backward reads
# (norm inputs, q/k/v, attention output, residuals: about 8 of hidden size; gate, up, their
# product and the down input: 4 of intermediate size).
_KEPT_HIDDEN = 16
_KEPT_INTERMEDIATE = 8


def shape_from_config(path: Path) -> ModelShape | None:
    try:
        cfg = json.loads(path.read_text())
        cfg = cfg.get("text_config", cfg)
        heads = cfg["num_attention_heads"]
        return ModelShape(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_shape(base_model: str, *, local_dir: Path | None = None) -> ModelShape | None:
    if local_dir is not None:
        shape = shape_from_config(local_dir / "config.json")
        if shape:
            return shape
    name = base_model.lower().replace("_", "-")
    for key in sorted(KNOWN_SHAPES, key=len, reverse=True):  # most specific name first
        if key in name:
            return KNOWN_SHAPES[key]
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    total_gib: float
    weights_gib: float
    lora_gib: float
    activations_gib: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.__dict__.items()}


def estimate(
    spec: JobSpec, shape: ModelShape, *, engine: str = "unsloth", tokens: int | None = None
) -> MemoryEstimate:
    """Peak GPU memory of training ``spec`` on ``shape`` with ``engine``: any engine name, as
    picked or as loaded ("transformers+peft+bnb4bit"); only Unsloth's activations differ.
    ``tokens``: a micro-batch of that many tokens instead of the spec's batch x max_seq_length."""
    projections = shape.projection_shapes()
    per_layer = sum(a * b for a, b in projections.values())
    layer_params = per_layer * shape.num_hidden_layers
    embed = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    weight_bytes = layer_params * (_NF4_BYTES if spec.model.load_in_4bit else 2) + embed * 2
    targets = [projections[m] for m in spec.lora.target_modules if m in projections]
    lora_params = spec.lora.r * sum(a + b for a, b in targets) * shape.num_hidden_layers
    eight_bit = spec.training.optim in ("adamw_8bit", "paged_adamw_8bit")
    # fp32 weights + fp32 grads + two Adam moments (1 byte each in 8-bit, 4 in 32-bit)
    lora_bytes = lora_params * (4 + 4 + (2 if eight_bit else 8))
    # modules_to_save: a full trainable fp32 copy of each (one for tied embeddings), Adam in 32-bit
    copies = 1 if shape.tie_word_embeddings else len(spec.lora.modules_to_save)
    if spec.lora.modules_to_save:
        lora_bytes += copies * shape.vocab_size * shape.hidden_size * (4 + 4 + 8)
    if tokens is None:
        tokens = spec.training.per_device_train_batch_size * spec.model.max_seq_length
        if spec.training.method != "sft":  # dpo / orpo: a pair is two sequences in one batch
            tokens *= 2
    if engine == "unsloth":
        act = tokens * shape.hidden_size * _UNSLOTH_ACT_PER_TOKEN_HIDDEN
    else:
        act = tokens * (
            shape.hidden_size * _HF_ACT_PER_TOKEN_HIDDEN + shape.vocab_size * _HF_LOGIT_BYTES
        )
    if not spec.lora.use_gradient_checkpointing:  # every layer keeps what its backward reads
        per_layer = shape.hidden_size * _KEPT_HIDDEN + shape.intermediate_size * _KEPT_INTERMEDIATE
        act += tokens * shape.num_hidden_layers * per_layer
    total = weight_bytes + lora_bytes + act
    return MemoryEstimate(total / GIB, weight_bytes / GIB, lora_bytes / GIB, act / GIB)


def shape_of(config: Any) -> ModelShape | None:
    """The shape of a loaded model's config (transformers' PretrainedConfig), None if unreadable."""
    config = getattr(config, "text_config", None) or config
    try:
        heads = int(config.num_attention_heads)
        return ModelShape(
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_hidden_layers=int(config.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
    except (AttributeError, TypeError, ValueError):
        return None


def tokens_within(
    spec: JobSpec, shape: ModelShape, *, budget_gib: float, engine: str, most: int
) -> int:
    """The most tokens (up to ``most``) one micro-batch may hold with the estimate within
    ``budget_gib``; 0 when not even one token fits."""
    low, high = 0, most
    while low < high:  # the estimate grows with the tokens: bisect
        mid = (low + high + 1) // 2
        if estimate(spec, shape, engine=engine, tokens=mid).total_gib <= budget_gib:
            low = mid
        else:
            high = mid - 1
    return low
