"""GPU training benchmark: the service's trainer vs a bare Unsloth loop vs transformers + peft.

Random weights of a real architecture (Llama-3-8B-Instruct or Mistral-7B-Instruct-v0.2) with the
real tokenizer (bench/real_tokenizers.py), so speed and memory are faithful; quality is not the
point. Run each measurement in its own process: Unsloth patches transformers when imported.

    python bench/gpu_train.py make llama3-8b TOKENIZER_DIR MODEL_DIR
    python bench/gpu_train.py service MODEL_DIR --engine unsloth|transformers [--steps --bs --seq]
        [--method sft|dpo|orpo|sft,dpo,orpo]   (dpo / orpo: --bs random pairs a step, prompt and
                                   each answer seq/2 tokens, through core.training.preference;
                                   several methods: one after the other on one base, loaded once,
                                   a line each and a line comparing them)
    python bench/gpu_train.py bare MODEL_DIR [--steps --bs --seq]
    python bench/gpu_train.py epoch MODEL_DIR DATA.jsonl [--no-packing]

Each prints one JSON line (and appends it to $BENCH_OUT if set). bench/gpu_all.sh runs the set.
The service mode also runs on a CPU (--engine transformers, e.g. on the converted SmolLM2 in the
model cache) as a smoke run: its peak memory is then the process's resident set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METHODS = ("sft", "dpo", "orpo")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "arch": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    "llama3-1b": {
        "arch": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "mistral-7b": {
        "arch": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
}


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "a") as fh:
            fh.write(line + "\n")


def make(shape: str, tokenizer_dir: str, out: str) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    started = time.time()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = dict(SHAPES[shape])
    arch = cfg.pop("arch")
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (MistralConfig, MistralForCausalLM)
    )
    config = config_cls(
        **cfg,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_cls(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    emit(
        {
            "made": shape,
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            "s": round(time.time() - started, 1),
        }
    )


def _spec(
    model_dir: str,
    *,
    engine: str,
    bs: int,
    seq: int,
    steps: int,
    grad_accum: int = 1,
    packing: bool = False,
    epochs: float = 1,
    method: str = "sft",
) -> Any:
    from core.spec import JobSpec

    preference = None
    if method != "sft":  # the prompt and each answer half of max_seq_length
        preference = {"max_prompt_length": seq // 2, "max_completion_length": seq // 2}
    return JobSpec.model_validate(
        {
            "model_config": {"base_model": model_dir, "max_seq_length": seq, "load_in_4bit": True},
            "lora_config": {
                "r": 16,
                "lora_alpha": 16,
                "lora_dropout": 0,
                "target_modules": PROJECTIONS,
                "use_gradient_checkpointing": "unsloth" if engine == "unsloth" else True,
            },
            "training_config": {
                "per_device_train_batch_size": bs,
                "gradient_accumulation_steps": grad_accum,
                "max_steps": steps,
                "num_train_epochs": epochs,
                "warmup_steps": 5,
                "learning_rate": 2e-4,
                "optim": "adamw_8bit",
                "logging_steps": 1,
                "engine": engine,
                "packing": packing,
                "method": method,
                "preference": preference,
                "save_steps": 0,
            },
        }
    )


def _synthetic(vocab: int, *, n: int, seq: int) -> list[Any]:
    from core.data.tokenize import Encoded

    rng = random.Random(1)
    rows = [[rng.randrange(10, vocab - 300) for _ in range(seq)] for _ in range(n)]
    return [Encoded(ids, ids, False) for ids in rows]


def _synthetic_pairs(vocab: int, *, n: int, seq: int) -> list[Any]:
    """Random preference pairs: a seq/2-token prompt and two seq/2-token answers."""
    from core.data.preference import EncodedPair
    from core.data.tokenize import Encoded

    rng = random.Random(1)

    def ids(count: int) -> list[int]:
        return [rng.randrange(10, vocab - 300) for _ in range(count)]

    empty = Encoded([], [], False)
    return [
        EncodedPair(ids(seq // 2), ids(seq // 2), ids(seq // 2), chosen=empty, rejected=empty)
        for _ in range(n)
    ]


def methods_arg(value: str) -> list[str]:
    """--method: one training method, or several comma-separated (sft,dpo,orpo), each once."""
    methods = [m.strip() for m in value.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS) or len(set(methods)) != len(methods):
        raise argparse.ArgumentTypeError(
            f"{value!r}: give one or more of {', '.join(METHODS)}, comma-separated, each once"
        )
    return methods


def service(
    model_dir: str,
    *,
    engine: str,
    steps: int,
    bs: int,
    seq: int,
    methods: Sequence[str] = ("sft",),
) -> list[dict[str, Any]]:
    """The worker's own code path, one method after the other on one base, as a training worker
    runs consecutive jobs: engines.load(keep=True) + trainer.train (dpo / orpo:
    preference.train) with the sink it reports to, then engines.give_back, which puts the base
    back for the next (core/training/base_cache.py). The base loads once; the methods after the
    first reuse it, so their load_s is the adapter's alone. Each method's peak memory is its own
    (the peak is reset between them; the base is in it for all)."""
    from core.training import base_cache

    base_cache.release("bench start")
    try:
        records = [
            _service_one(model_dir, engine=engine, steps=steps, bs=bs, seq=seq, method=m)
            for m in methods
        ]
    finally:
        base_cache.release("bench end")
    if len(records) > 1:
        emit(_compared(records))
    return records


def _service_one(
    model_dir: str, *, engine: str, steps: int, bs: int, seq: int, method: str
) -> dict[str, Any]:
    import torch

    from core.training import engines, preference, trainer
    from core.training.sink import ListSink

    spec = _spec(model_dir, engine=engine, bs=bs, seq=seq, steps=steps, method=method)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    loaded = engines.load(spec, model_dir, keep=True)
    load_s = time.time() - started
    reused = any(n.startswith("base model reused") for n in loaded.notes)
    name = loaded.engine
    sink = ListSink()
    out = Path("/tmp/bench-out") / method
    try:
        if method == "sft":
            items = _synthetic(len(loaded.tokenizer), n=steps * bs, seq=seq)
            trainer.train(spec, loaded, items, output_dir=out, sink=sink)
        else:
            pairs = _synthetic_pairs(len(loaded.tokenizer), n=steps * bs, seq=seq)
            preference.train(spec, loaded, pairs, output_dir=out, sink=sink)
    finally:
        engines.give_back(loaded)  # the base is kept for the next method
    rows = [r for r in sink.rows if r.get("loss") is not None]
    # The first two steps pay the warm-up (compilation, the allocator); a short run keeps all.
    rates = [r["tokens_per_second"] for r in rows[2:] or rows if r.get("tokens_per_second")]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = max((r.get("peak_memory_mb") or 0) for r in rows) / 2**10
    record = {
        "bench": "service",
        "method": method,
        "engine": name,
        "model": Path(model_dir).name,
        "bs": bs,
        "seq": seq,
        "steps": steps,
        "base_reused": reused,
        "load_s": round(load_s, 1),
        "tokens_per_s_median": round(statistics.median(rates), 1) if rates else None,
        "peak_gib": round(peak, 2),
        "loss_first": round(rows[0]["loss"], 3),
        "loss_last": round(rows[-1]["loss"], 3),
        "rewards_margin_last": _rounded(rows[-1].get("rewards_margin")),
        "rewards_accuracy_last": _rounded(rows[-1].get("rewards_accuracy")),
    }
    emit(record)
    return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _compared(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One line over the methods: speed and peak memory, each over the first method's."""
    first = records[0]

    def ratio(record: dict[str, Any], key: str) -> float | None:
        if not record[key] or not first[key]:
            return None
        return round(record[key] / first[key], 3)

    return {
        "bench": "service_methods",
        "engine": first["engine"],
        "model": first["model"],
        "bs": first["bs"],
        "seq": first["seq"],
        "steps": first["steps"],
        "relative_to": first["method"],
        "methods": {
            r["method"]: {
                "tokens_per_s_median": r["tokens_per_s_median"],
                "tokens_per_s_ratio": ratio(r, "tokens_per_s_median"),
                "peak_gib": r["peak_gib"],
                "peak_ratio": ratio(r, "peak_gib"),
                "base_reused": r["base_reused"],
                "rewards_margin_last": r["rewards_margin_last"],
            }
            for r in records
        },
    }


def bare(model_dir: str, *, steps: int, bs: int, seq: int) -> None:
    """A bare Unsloth loop on the same spec (the shape of shared/gpu/probe.py's loop)."""
    import bitsandbytes as bnb
    import torch
    from unsloth import FastLanguageModel

    started = time.time()
    model, tok = FastLanguageModel.from_pretrained(
        model_dir, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=PROJECTIONS,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=42,
    )
    load_s = time.time() - started
    opt = bnb.optim.AdamW8bit(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01
    )
    model.train()
    gen = torch.Generator(device="cuda").manual_seed(1)
    times = []
    for _ in range(steps):
        ids = torch.randint(10, len(tok) - 300, (bs, seq), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t = time.time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.time() - t)
    step = statistics.median(times[2:])
    emit(
        {
            "bench": "bare_unsloth",
            "model": Path(model_dir).name,
            "bs": bs,
            "seq": seq,
            "steps": steps,
            "load_s": round(load_s, 1),
            "tokens_per_s_median": round(bs * seq / step, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
    )


def epoch(
    model_dir: str,
    data: str,
    *,
    packing: bool,
    mode: str = "length_grouped",
    bs: int = 2,
    grad_accum: int = 4,
    repeat: int = 1,
) -> None:
    """One epoch of the recipe's 2,000-row set at its settings, through the service path.

    With ``repeat`` > 1 the same process runs the epoch again on a freshly loaded model: the
    first run pays Unsloth's one-off compilation (a cold worker), the later ones show what a
    worker that already ran a job takes.
    """
    import torch

    from core.data.conversations import to_examples
    from core.data.sources import load_rows
    from core.data.tokenize import encode_all
    from core.spec import RECIPE_SYSTEM_PROMPT, DatasetSection
    from core.training import engines, trainer
    from core.training.sink import ListSink

    spec = _spec(
        model_dir,
        engine="unsloth",
        bs=bs,
        seq=2048,
        steps=0,
        grad_accum=grad_accum,
        packing=packing,
    )
    spec.training.packing_mode = mode  # type: ignore[assignment]
    for run in range(1, repeat + 1):
        started = time.time()
        loaded = engines.load(spec, model_dir)
        load_s = time.time() - started
        torch.cuda.reset_peak_memory_stats()
        started = time.time()
        rows = load_rows(DatasetSection(name=data))
        examples = to_examples(rows, system_prompt=RECIPE_SYSTEM_PROMPT, input_field="prompt")
        encoded = encode_all(loaded.tokenizer, examples.examples, max_length=2048)
        prep_s = time.time() - started
        sink = ListSink()
        started = time.time()
        outcome = trainer.train(
            spec, loaded, encoded.items, output_dir=Path("/tmp/bench-out"), sink=sink
        )
        train_s = time.time() - started
        emit(
            {
                "bench": "epoch",
                "run": run,
                "engine": loaded.engine,
                "model": Path(model_dir).name,
                "packing": packing,
                "packing_mode": mode if packing else None,
                "bs": bs,
                "grad_accum": grad_accum,
                "rows": len(rows),
                "tokens": encoded.stats["tokens"],
                "steps": outcome.steps,
                "load_s": round(load_s, 1),
                "prep_s": round(prep_s, 1),
                "train_s": round(train_s, 1),
                "tokens_per_s": round(encoded.stats["tokens"] / train_s, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "loss_first": round(sink.rows[0]["loss"], 3),
                "loss_last": round(sink.rows[-1]["loss"], 3),
                # Per-step rates show warm-up and recompilation apart from the steady state.
                "step_tokens_per_s": [round(r["tokens_per_second"]) for r in sink.rows],
            }
        )
        del loaded, outcome
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("tokenizer_dir")
    p.add_argument("out")
    for name in ("service", "bare"):
        p = sub.add_parser(name)
        p.add_argument("model_dir")
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--bs", type=int, default=2)
        p.add_argument("--seq", type=int, default=2048)
        if name == "service":
            p.add_argument("--engine", choices=["unsloth", "transformers"], default="unsloth")
            p.add_argument(
                "--method",
                type=methods_arg,
                default=["sft"],
                help="sft, dpo or orpo; several comma-separated (sft,dpo,orpo) run one after "
                "the other on one base, loaded once",
            )
    p = sub.add_parser("epoch")
    p.add_argument("model_dir")
    p.add_argument("data")
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--mode", choices=["length_grouped", "padding_free"], default="length_grouped")
    p.add_argument("--bs", type=int, default=2, help="micro-batch (the recipe's 2)")
    p.add_argument("--grad-accum", type=int, default=4, help="the recipe's 4")
    p.add_argument("--repeat", type=int, default=1, help="runs in one process: cold, then warm")
    args = parser.parse_args()
    if args.cmd == "make":
        make(args.shape, args.tokenizer_dir, args.out)
    elif args.cmd == "service":
        service(
            args.model_dir,
            engine=args.engine,
            steps=args.steps,
            bs=args.bs,
            seq=args.seq,
            methods=args.method,
        )
    elif args.cmd == "bare":
        bare(args.model_dir, steps=args.steps, bs=args.bs, seq=args.seq)
    else:
        epoch(
            args.model_dir,
            args.data,
            packing=not args.no_packing,
            mode=args.mode,
            bs=args.bs,
            grad_accum=args.grad_accum,
            repeat=args.repeat,
        )


if __name__ == "__main__":
    main()
