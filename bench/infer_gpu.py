"""GPU inference benchmark: one stream, 128 new tokens, Llama-3-8B shape, four paths.

Random weights of the real Llama-3-8B architecture with the real Llama 3 tokenizer and chat
template (bench/real_tokenizers.py), a random LoRA adapter (r=16, all 7 projections): speed is
faithful, answers are not the point. Each path runs in its own process (Unsloth patches
transformers when imported) through the service's own code (core.inference.cuda and the shared
``generate_batch``), greedy, ``min_new_tokens`` = ``max_new_tokens`` so every run decodes them all.
``bf16_static_compiled`` is transformers' ``generate()`` over a static cache with a compiled
forward; ``bf16_graph_loop`` is the engine's fast path (core/inference/static_decode.py: one
CUDA-graph replay per token), the one ``/infer`` uses for a merged export.

    python bench/infer_gpu.py make TOKENIZER_DIR WORK_DIR [--adapters N]
        # WORK_DIR/model, WORK_DIR/adapter (and adapter_1 .. adapter_{N-1}, other seeds)
    python bench/infer_gpu.py run PATH WORK_DIR [--tokens 128] [--runs 3] [--cap-gib 15]
        [--repetition-penalty 1.0,1.1]
    PATH: unsloth_4bit_lora | hf_4bit_peft | bf16_eager | bf16_static_compiled | bf16_graph_loop
          | bf16_merged_graph | bnb4_lora_graph

``bf16_merged_graph`` and ``bnb4_lora_graph`` are the engine's own fast paths for an adapter
(core/inference/fast.py, issue #14): the adapter merged in memory into a bf16 copy of the base,
or applied unmerged to the base in 4-bit (bitsandbytes), each through the CUDA-graph loop.
``bnb4_lora_graph`` imports Unsloth first when installed, as an inference worker has.
``--cap-gib`` caps the process's CUDA memory (a T4 holds 15 GiB).

Prints one JSON line per run (appended to $BENCH_OUT if set): time to first token (prefill +
first token) and decode tokens/s, medians of 3 after a warm-up. The random weights stand in for
the merged model in the two bf16 paths (merging changes values, not shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.inference.generate import Generation, GenerationRequest, generate_one

PATHS = (
    "unsloth_4bit_lora",
    "hf_4bit_peft",
    "bf16_eager",
    "bf16_static_compiled",
    "bf16_graph_loop",
    "bf16_merged_graph",
    "bnb4_lora_graph",
)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = "What are the symptoms of iron deficiency anemia, and how is it treated?"
SYSTEM = "You are a medical assistant. Answer the question truthfully."


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "a") as fh:
            fh.write(line + "\n")


def make(tokenizer_dir: str, work: str, *, adapters: int = 1) -> None:
    """The 8B-shaped model (bench/gpu_train.py's shape) and random LoRA adapters for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.gpu_train import make as make_model

    model_dir, adapter_dir = Path(work) / "model", Path(work) / "adapter"
    make_model("llama3-8b", tokenizer_dir, str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map={"": 0}
    )
    for n in range(adapters):
        torch.manual_seed(n)
        lora = LoraConfig(
            r=16, lora_alpha=16, target_modules=PROJECTIONS, init_lora_weights=False
        )  # non-zero B: the adapter really computes
        peft = get_peft_model(model, lora)
        peft.save_pretrained(adapter_dir if n == 0 else Path(work) / f"adapter_{n}")
        model = peft.unload()  # the bare base again, for the next seed
    emit({"made": "adapters", "count": adapters, "dir": str(adapter_dir)})


def _load(path: str, work: Path) -> tuple[Callable[[GenerationRequest], Generation], str | None]:
    """A function that answers one request on this path, and the adapter name it needs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.inference.cuda import StaticCompiled, attach_adapter, load_base

    model_dir, adapter_dir = str(work / "model"), str(work / "adapter")
    if path in ("bf16_merged_graph", "bnb4_lora_graph"):
        from core.inference import fast

        if path == "bnb4_lora_graph":
            from core.inference.cuda import unsloth_available

            unsloth_available()  # imports Unsloth if installed: the worker has its patches on
        build = fast.build_merged if path == "bf16_merged_graph" else fast.build_lora_4bit
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        built = build(model_dir, adapter_dir, tokenizer, cache_tokens=fast.STATIC_CACHE_TOKENS)
        emit({"path": path, "built": built.kind, "fullgraph": built.fullgraph})
        return built.generate, None
    if path in ("unsloth_4bit_lora", "hf_4bit_peft"):
        unsloth = path == "unsloth_4bit_lora"
        model, tokenizer = load_base(model_dir, load_in_4bit=True, unsloth=unsloth)
        model = attach_adapter(model, adapter_dir, "job", unsloth=unsloth)
        return _through_generate(model, tokenizer, {}), "job"
    if path == "bf16_graph_loop":
        return StaticCompiled(model_dir).generate, None
    if path == "bf16_static_compiled":
        compiled = StaticCompiled(model_dir)
        return _through_generate(
            compiled.model, compiled.tokenizer, compiled.generate_kwargs()
        ), None
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map={"": 0}
    ).eval()
    return _through_generate(model, AutoTokenizer.from_pretrained(model_dir), {}), None


def _through_generate(
    model: Any, tokenizer: Any, kwargs: dict[str, Any]
) -> Callable[[GenerationRequest], Generation]:
    """transformers' generate(), forced to decode every token as ignore_eos asks."""

    def answer(request: GenerationRequest) -> Generation:
        forced = {**kwargs, "min_new_tokens": request.max_new_tokens}
        return generate_one(model, tokenizer, request, generate_kwargs=forced)

    return answer


def run(
    path: str,
    work: str,
    *,
    tokens: int,
    repeats: int = 3,
    cap_gib: float | None = None,
    penalties: tuple[float, ...] = (1.0,),
) -> None:
    """Load PATH once, then time it at each repetition penalty (the service's default is 1.1:
    on the graph loop the penalty is a seen-token mask on the device, outside the graph)."""
    import torch

    if cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    started = time.perf_counter()
    answer, adapter = _load(path, Path(work))
    load_s = time.perf_counter() - started
    for penalty in penalties:
        request = GenerationRequest(
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION},
            ],
            max_new_tokens=tokens,
            adapter=adapter,
            ignore_eos=True,
            repetition_penalty=penalty,
        )
        warm = time.perf_counter()
        for _ in range(2 if "static" in path or "graph" in path else 1):  # compile, record
            answer(request)
        warm_s = time.perf_counter() - warm
        runs = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            runs.append(answer(request))
        decode = [
            (g.completion_tokens - 1) / (g.seconds - g.first_token_seconds)
            for g in runs
            if g.first_token_seconds is not None
        ]
        emit(
            {
                "path": path,
                "cap_gib": cap_gib,
                "repetition_penalty": penalty,
                "gpu": torch.cuda.get_device_name(0),
                "prompt_tokens": runs[0].prompt_tokens,
                "new_tokens": runs[0].completion_tokens,
                "ttft_ms_median": round(
                    statistics.median(g.first_token_seconds or 0 for g in runs) * 1000, 1
                ),
                "decode_tokens_per_s_median": round(statistics.median(decode), 1),
                "end_to_end_tokens_per_s_median": round(
                    statistics.median(g.completion_tokens / g.seconds for g in runs), 1
                ),
                "load_s": round(load_s, 1),
                "warm_up_s": round(warm_s, 1),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    made = sub.add_parser("make")
    made.add_argument("tokenizer_dir")
    made.add_argument("work")
    made.add_argument("--adapters", type=int, default=1)
    ran = sub.add_parser("run")
    ran.add_argument("path", choices=PATHS)
    ran.add_argument("work")
    ran.add_argument("--tokens", type=int, default=128)
    ran.add_argument("--runs", type=int, default=3)
    ran.add_argument("--cap-gib", type=float, default=None)
    ran.add_argument(
        "--repetition-penalty",
        default="1.0",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        help="one or several, comma-separated (1.0,1.1): each timed on the same load",
    )
    args = parser.parse_args()
    if args.command == "make":
        make(args.tokenizer_dir, args.work, adapters=args.adapters)
    else:
        run(
            args.path,
            args.work,
            tokens=args.tokens,
            repeats=args.runs,
            cap_gib=args.cap_gib,
            penalties=args.repetition_penalty,
        )


if __name__ == "__main__":
    main()
