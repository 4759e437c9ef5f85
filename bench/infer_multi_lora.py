"""Issue #14 (a) on the GPU: questions to 8 adapters through the batched multi-LoRA fast lane.

Run as ``python bench/infer_ready.py multi-lora WORK_DIR`` (its docstring says what is
measured). In one process, as an inference worker: Unsloth imported when installed, the
engine's own CUDA-graph lane builds the base's multi-LoRA model (``FastPaths.start_multi``)
and every answer goes through ``InferenceEngine.submit`` with backend auto. JSON lines on
stdout, appended to $BENCH_OUT if set; a ``partial`` line is written before the peft check so
a timeout still leaves the timings.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.recipe_job import emit

QUESTION = "What are the symptoms of iron deficiency anemia, and how is it treated?"


def _tokens(answers: list[dict[str, Any]]) -> int:
    return sum(a["usage"]["completion_tokens"] for a in answers)


def multi_lora(work: str, *, adapters: int, tokens: int, four_bit: bool, reference: int) -> None:
    os.environ["MEDTUNE_MODEL_ROOTS"] = json.dumps([str(Path(work).resolve())])
    import torch
    from transformers import AutoTokenizer

    from core.base_models import resolve
    from core.data.tokenize import ensure_chat_template
    from core.inference.cuda import unsloth_available
    from core.inference.engine import InferenceEngine, InferenceRequest

    folders = [Path(work) / "adapter"] + [Path(work) / f"adapter_{n}" for n in range(1, adapters)]
    model = str((Path(work) / "model").resolve())
    models_dir = Path(tempfile.mkdtemp())
    engine = InferenceEngine(models_dir=models_dir, max_batch=adapters, batch_wait_s=0.05)
    record: dict[str, Any] = {
        "bench": "infer_multi_lora",
        "adapters": adapters,
        "max_new_tokens": tokens,
        "unsloth_imported": unsloth_available(),  # as on an inference worker
        "gpu": torch.cuda.get_device_name(0),
    }
    tokenizer = AutoTokenizer.from_pretrained(model)
    ensure_chat_template(tokenizer)
    base_path = resolve(model, models_dir=models_dir)
    started = time.perf_counter()
    kind = "multi_4bit" if four_bit else "multi_bf16"
    if not engine.fast.start_multi(base_path, tokenizer, kind=kind):
        raise SystemExit(f"multi-LoRA build not started: {engine.fast.notes}")
    engine.fast.builds[-1].result()
    multi = engine.fast.multi(base_path)
    if multi is None:
        emit({**record, "build_error": engine.fast.notes})
        return
    record.update(build_s=round(time.perf_counter() - started, 1), kind=multi.kind)
    record.update(fullgraph=multi.fullgraph, rows=multi.rows, slots=multi.slots.slots)
    record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    def ask(folder: Path) -> InferenceRequest:
        return InferenceRequest(
            base_model=model,
            messages=[{"role": "user", "content": QUESTION}],
            adapter_dir=str(folder),
            adapter_name=folder.name,
            max_new_tokens=tokens,
        )

    started = time.perf_counter()  # the first round copies each adapter into its slot
    [f.result() for f in [engine.submit(ask(folder)) for folder in folders]]
    record["slot_fill_round_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    one_by_one = [engine.submit(ask(folder)).result() for folder in folders]
    record["sequential_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    together = [f.result() for f in [engine.submit(ask(folder)) for folder in folders]]
    record["concurrent_s"] = round(time.perf_counter() - started, 2)
    record["speedup"] = round(record["sequential_s"] / record["concurrent_s"], 2)
    record["tokens"] = {"sequential": _tokens(one_by_one), "concurrent": _tokens(together)}
    record["concurrent_tokens_per_s"] = round(_tokens(together) / record["concurrent_s"], 1)
    record["backends"] = sorted({f"{a['backend']}/{a.get('fast_path')}" for a in together})
    record["sequential_batch_sizes"] = [a["batch_size"] for a in one_by_one]
    record["concurrent_batch_sizes"] = [a["batch_size"] for a in together]
    record["concurrent_same_answers"] = sum(
        a["answer"] == b["answer"] and a["usage"] == b["usage"]
        for a, b in zip(one_by_one, together, strict=True)
    )
    # Where the answers part, in characters: bf16 kernels of a batch of 8 are not those of a
    # batch of 1, and random weights have near-tied logits, so whole-answer equality says little.
    record["concurrent_agree_chars"] = [
        _agreeing(a["answer"], b["answer"]) for a, b in zip(one_by_one, together, strict=True)
    ]
    record["answer_chars"] = [len(a["answer"]) for a in one_by_one]
    record["distinct_answers"] = len({a["answer"] for a in one_by_one})
    record["loads"] = {**engine.loads, **multi.slots.loads}  # slot: adapters copied in
    emit({**record, "partial": True})
    if reference > 0:
        record["same_as_peft_alone"] = _peft_alone(
            model, folders[:reference], one_by_one, tokenizer, tokens=tokens, four_bit=four_bit
        )
    emit(record)


def _agreeing(a: str, b: str) -> int:
    """How many leading characters two answers share."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _peft_alone(
    model: str,
    folders: list[Path],
    answers: list[dict[str, Any]],
    tokenizer: Any,
    *,
    tokens: int,
    four_bit: bool,
) -> str:
    """How many of the lane's answers peft's unmerged LoRA, alone and eager, gives too."""
    from peft import PeftModel

    from core.inference.generate import GenerationRequest
    from core.inference.graphs import load_plain
    from core.inference.static_decode import StaticDecoder

    base = load_plain(model, four_bit=four_bit)
    peft = PeftModel.from_pretrained(base, str(folders[0]), adapter_name=folders[0].name)
    for folder in folders[1:]:
        peft.load_adapter(str(folder), adapter_name=folder.name)
    same, agree = 0, []
    for folder, answer in zip(folders, answers, strict=False):
        peft.set_adapter(folder.name)
        decoder = StaticDecoder(peft.eval(), tokenizer, max_cache_tokens=1024, compile=False)
        request = GenerationRequest(
            messages=[{"role": "user", "content": QUESTION}], max_new_tokens=tokens
        )
        text = decoder.generate(request).text
        same += text == answer["answer"]
        agree.append(_agreeing(text, answer["answer"]))
    return f"{same} of {len(folders)}, agreeing for the first {agree} characters"
