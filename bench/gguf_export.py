"""Time the GGUF export of SmolLM2 (f16 write, q8_0 and q4_k_m quantization) and llama.cpp's
single-stream decode speed of the q4_k_m file.

    .venv/bin/python bench/gguf_export.py [--tokens 128] [--threads N] [--out DIR]

Needs the gguf extra (llama-cpp-python). Exports the embedded model itself (a zero LoRA merges
to the same weights), so the figures are the export's and llama.cpp's, not a tuned model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def decode_speed(path: Path, prompt: str, *, tokens: int, threads: int) -> dict[str, Any]:
    """Time to first token and decode tokens/s, greedy, counting the token ids llama.cpp yields.

    The end-of-turn token does not stop the loop, so every run decodes exactly ``tokens``.
    """
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, n_threads=threads, seed=0, verbose=False)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        started = time.perf_counter()
        first = 0.0
        count = 0
        for _ in llm.generate(ids, temp=0.0):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == tokens:
                break
        ended = time.perf_counter()
    finally:
        llm.close()
    return {
        "prompt_tokens": len(ids),
        "new_tokens": count,
        "time_to_first_token_s": round(first - started, 3),
        "decode_tokens_per_s": round((count - 1) / (ended - first), 1),
    }


def main() -> None:
    from core.embedded_model import prepare_embedded_model
    from core.export.formats import SMOKE_QUESTIONS
    from core.export.gguf import file_name, quantize, smoke_test, write_f16
    from core.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model_dir = prepare_embedded_model(get_settings().models_dir)
    out = args.out or Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {}
    f16 = out / file_name("f16")
    started = time.perf_counter()
    write_f16(model_dir, f16, name="smollm2-135m-instruct")
    timings["write_f16_s"] = round(time.perf_counter() - started, 2)
    for quant in ("q8_0", "q4_k_m"):
        started = time.perf_counter()
        quantize(f16, out / file_name(quant), quant)
        timings[f"quantize_{quant}_s"] = round(time.perf_counter() - started, 2)
    sizes = {q: (out / file_name(q)).stat().st_size for q in ("f16", "q8_0", "q4_k_m")}
    started = time.perf_counter()
    answers = smoke_test(
        out / file_name("q4_k_m"),
        model_dir,
        system="Answer the question truthfully, you are a medical professional.",
        questions=SMOKE_QUESTIONS,
        max_new_tokens=256,
    )
    timings["smoke_test_q4_k_m_s"] = round(time.perf_counter() - started, 2)
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        [{"role": "user", "content": "Explain how type 2 diabetes is treated."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    speed = decode_speed(
        out / file_name("q4_k_m"), prompt, tokens=args.tokens, threads=args.threads
    )
    print(
        json.dumps(
            {
                "cpu": _cpu(),
                "cores": os.cpu_count(),
                "threads": args.threads,
                "timings": timings,
                "bytes": sizes,
                "q4_k_m_decode": speed,
                "smoke_finish": [a["finish_reason"] for a in answers],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
