"""Loading and compiling for the engine's CUDA-graph lane (core/inference/fast.py and
fast_multi.py): the plain transformers base, the compute dtype, each thread's CUDA-graph tree
state and dynamo's recompile limit."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


def bf16() -> Any:
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def own_graph_trees() -> None:
    """Give this thread CUDA-graph tree state of its own if it has none.

    torch._inductor.cudagraph_trees keeps its tree managers in a ``threading.local`` filled in
    by the thread that imported the module (and copied into autograd's threads); any other
    thread fails ``assert torch._C._is_key_in_tls(...)`` at its first compiled call.
    """
    from collections import defaultdict

    import torch

    try:
        from torch._inductor import cudagraph_trees as trees
    except ImportError:
        return
    local = getattr(trees, "local", None)
    if local is None or hasattr(local, "tree_manager_containers"):
        return
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)


def raise_recompile_limit() -> None:
    """Every fast model compiles its step function anew (its guards hold the model): a
    long-lived worker must not reach dynamo's recompile limit (8) and fall back to eager."""
    import torch._dynamo

    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if getattr(config, limit, 64) < 64:
            setattr(config, limit, 64)


def load_plain(base_path: str, *, four_bit: bool) -> Any:
    """The base through transformers alone, bf16 or 4-bit (bitsandbytes NF4), on card 0."""
    import json

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from core.inference.cuda import restore_stock_rotary

    config = json.loads((Path(base_path) / "config.json").read_text())
    quant: dict[str, Any] = {}
    if four_bit and "quantization_config" not in config:  # a bnb-4bit checkpoint brings its own
        quant["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=bf16(),
        )
    model = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=bf16(), device_map={"": 0}, **quant
    ).eval()
    restore_stock_rotary(model)
    return model
