"""Run training with the spec's training_config, reporting each logging step to a sink."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.data.tokenize import IGNORE_INDEX, Encoded
from core.spec import JobSpec
from core.training.engines import Loaded
from core.training.held_out import eval_sample
from core.training.meter import StepMeter
from core.training.packing import (
    GroupedCollator,
    PackedCollator,
    StepSampler,
    group_by_length,
    largest_step,
    pack,
    step_rows,
)
from core.training.sink import MetricsSink

# A step's rows may grow past the recipe's micro-batch while the memory estimate stays within
# the smallest card jobs are routed to (a T4's 15 GiB), so a job fits wherever it lands.
FOLD_BUDGET_GIB = 15.0
# 8-bit and paged optimizers live in bitsandbytes' CUDA kernels.
_CUDA_ONLY_OPTIMS = {"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"}


@dataclass
class TrainOutcome:
    steps: int
    total_steps: int
    cancelled: bool
    final_loss: float | None
    notes: list[str]
    stop_reason: str | None = None  # max_steps, epochs, early_stopping or cancelled
    kept_step: int | None = None  # whose weights the adapter holds (keep: best or last)


class TrainingRun:
    """A trainer with the callbacks of every run, SFT or preference: metric rows, cancel checks
    and held-out eval (SinkCallback), then early stopping, which reads its eval losses."""

    def __init__(
        self, spec: JobSpec, trainer: Any, sink: MetricsSink, eval_batches: list[Any]
    ) -> None:
        # Imported here: they import transformers, which a caller may not need loaded yet.
        from transformers import PrinterCallback

        from core.training.early_stopping import EarlyStopping
        from core.training.sink_callback import SinkCallback

        self.trainer, self.sink = trainer, sink
        self.callback = SinkCallback(spec, sink, trainer, eval_batches)
        trainer.add_callback(self.callback)
        self.stopper = EarlyStopping(spec, self.callback)  # after the callback: it reads its evals
        trainer.add_callback(self.stopper)
        trainer.remove_callback(PrinterCallback)  # the sink reports; no raw dicts on stdout

    def train(self, resume_from: Path | None) -> None:
        try:
            self.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except BaseException:
            # Keep the rows up to the failure; a failed write must not hide the training error.
            with contextlib.suppress(Exception):
                self.sink.flush()
            raise

    def outcome(self, model: Any, notes: list[str]) -> TrainOutcome:
        """The run's last rows written, the weights to keep put into ``model``, what happened."""
        state, callback = self.trainer.state, self.callback
        if callback.pending_eval is not None:  # measured at a step that logged no row
            self.sink.log(state.global_step, {"eval_loss": callback.pending_eval})
        self.sink.flush()
        stop_reason, kept_step = self.stopper.finish(
            model, final_step=state.global_step, cancelled=callback.cancelled
        )
        return TrainOutcome(
            steps=state.global_step,
            total_steps=state.max_steps,
            cancelled=callback.cancelled,
            final_loss=callback.last_loss,
            notes=notes,
            stop_reason=stop_reason,
            kept_step=kept_step,
        )


class PadCollator:
    """Right-pads a batch; labels of padding are ignored by the loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids, labels, mask = [], [], []
        for b in batch:
            pad = width - len(b["input_ids"])
            ids.append(b["input_ids"] + [self.pad_id] * pad)
            labels.append(b["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(b["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
            "_real_tokens": sum(len(b["input_ids"]) for b in batch),
            "_samples": len(batch),
        }


def _rows(spec: JobSpec, items: list[Encoded], *, capacity: int) -> list[dict[str, Any]]:
    """The dataset rows the collator takes: packed rows, length groups or single examples."""
    cfg = spec.training
    if cfg.packing and cfg.packing_mode == "padding_free":
        return pack(items, capacity=capacity, seed=cfg.seed)
    if cfg.packing:
        return group_by_length(items, capacity=capacity, seed=cfg.seed)  # type: ignore[return-value]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in items]


@dataclass
class DataLayout:
    rows: list[Any]
    collator: Any
    eval_batches: list[dict[str, Any]]
    rows_per_step: int | None = None  # set for step_rows: accumulation counts rows
    sampler: StepSampler | None = None


def row_capacity(spec: JobSpec, loaded: Loaded, items: list[Encoded]) -> int:
    """Tokens one row of ``step_rows`` may hold: the fullest step, so each step is one row and
    launches its kernels once, where the memory estimate of such a row fits FOLD_BUDGET_GIB;
    never less than the recipe's own micro-batch (batch x max_seq_length), which routing
    already sized the card for."""
    from core.memory import shape_of, tokens_within
    from core.routing import MARGIN

    cfg = spec.training
    recipe = cfg.per_device_train_batch_size * spec.model.max_seq_length
    need = largest_step(
        items,
        examples_per_step=cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
        seed=cfg.seed,
    )
    shape = shape_of(getattr(loaded.model, "config", None))
    if need <= recipe or shape is None:
        return recipe
    budget = FOLD_BUDGET_GIB / MARGIN
    return max(
        recipe, tokens_within(spec, shape, budget_gib=budget, engine=loaded.engine, most=need)
    )


def _layout(
    spec: JobSpec,
    loaded: Loaded,
    items: list[Encoded],
    eval_items: list[Encoded],
    *,
    layout: Literal["steps", "padded"],
    pad_id: int,
) -> DataLayout:
    """The training rows, their collator and the held-out batches (collated as in training)."""
    cfg = spec.training
    capacity = cfg.per_device_train_batch_size * spec.model.max_seq_length
    if not cfg.packing and layout == "steps":
        rows, per_step = step_rows(
            items,
            examples_per_step=cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
            capacity=row_capacity(spec, loaded, items),
            seed=cfg.seed,
        )
        collator: Any = PackedCollator()
        evals = [collator([r]) for r in pack(eval_items, capacity=capacity, seed=cfg.seed)]
        sampler = StepSampler(len(rows), rows_per_step=per_step, seed=cfg.seed)
        return DataLayout(rows, collator, evals, per_step, sampler)
    if cfg.packing and cfg.packing_mode == "padding_free":
        collator = PackedCollator()
    elif cfg.packing:
        collator = GroupedCollator(pad_id)
    else:
        collator = PadCollator(pad_id)
    micro_batch = 1 if cfg.packing else cfg.per_device_train_batch_size
    eval_rows = _rows(spec, eval_items, capacity=capacity)
    evals = [
        collator(eval_rows[i : i + micro_batch]) for i in range(0, len(eval_rows), micro_batch)
    ]
    return DataLayout(_rows(spec, items, capacity=capacity), collator, evals)


def _precision(spec: JobSpec, notes: list[str]) -> tuple[bool, bool]:
    import torch

    fp16, bf16 = spec.training.fp16, spec.training.bf16
    if not torch.cuda.is_available():
        if fp16 or bf16:
            notes.append("fp16/bf16 need a GPU: trained in float32 on the CPU")
        return False, False
    if fp16 is None and bf16 is None:
        bf16 = torch.cuda.is_bf16_supported()
        return not bf16, bf16
    return bool(fp16), bool(bf16)


def _optimizer(spec: JobSpec, notes: list[str]) -> str:
    import torch

    optim = spec.training.optim
    if optim in _CUDA_ONLY_OPTIMS and not torch.cuda.is_available():
        notes.append(f"optim {optim} needs CUDA (bitsandbytes): used adamw_torch on the CPU")
        return "adamw_torch"
    return optim


def training_arguments(
    spec: JobSpec,
    loaded: Loaded,
    *,
    output_dir: Path,
    notes: list[str],
    rows_per_step: int | None = None,
    args_class: Any = None,
    **extra: Any,
) -> Any:
    """transformers' TrainingArguments for the spec on this host (precision and optimizer as the
    host allows, each fallback noted). ``rows_per_step``: each optimizer step accumulates that
    many padding-free rows (``step_rows``) instead of the spec's padded micro-batches.
    ``args_class`` (a TrainingArguments subclass such as TRL's DPOConfig) gets ``extra`` too."""
    import torch
    from transformers import TrainingArguments

    cfg = spec.training
    fp16, bf16 = _precision(spec, notes)
    micro_batch = 1 if cfg.packing or rows_per_step else cfg.per_device_train_batch_size
    return (args_class or TrainingArguments)(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=rows_per_step or cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs,
        learning_rate=cfg.learning_rate,
        fp16=fp16,
        bf16=bf16,
        logging_steps=cfg.logging_steps,
        optim=_optimizer(spec, notes),
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        seed=cfg.seed,
        # Unsloth wires its own checkpointing into the model; the worker may have skipped it.
        gradient_checkpointing=bool(_checkpointing(spec, loaded)) and loaded.engine != "unsloth",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or None,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        **extra,
    )


def _checkpointing(spec: JobSpec, loaded: Loaded) -> bool | str:
    chosen = getattr(loaded, "checkpointing", None)  # as loaded (core.training.checkpointing)
    return spec.lora.use_gradient_checkpointing if chosen is None else chosen


def padding_id(tokenizer: Any) -> int:
    """Any id will do for padding (its labels are ignored); Llama 3 ships no pad token."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def no_kv_cache(model: Any) -> None:
    """Training needs no KV cache, and with one transformers would not mask packed rows per
    example."""
    model.config.use_cache = False


def train(
    spec: JobSpec,
    loaded: Loaded,
    items: list[Encoded],
    *,
    output_dir: Path,
    sink: MetricsSink,
    resume_from: Path | None = None,
    eval_items: list[Encoded] | None = None,
    layout: Literal["steps", "padded"] = "steps",
) -> TrainOutcome:
    """Train to the spec's end (or a cancel), checkpointing into ``output_dir/checkpoints``.

    ``resume_from`` restores optimizer, scheduler, RNG and data position from a checkpoint.
    ``eval_items`` (the held-out split; a seeded sample of ``eval_max_examples`` of them) are
    scored every ``eval_steps`` and at the end; the eval loss goes into the metric row of the
    step it was measured at. The sink is flushed
    before every checkpoint and when training stops, however it stops.
    ``layout`` (unpacked jobs): ``steps`` lays each optimizer step out as padding-free rows
    (``step_rows``); ``padded`` runs the spec's padded micro-batches as given, the recipe's own
    layout, kept to check that both compute the same step.
    """
    # Imported here: it imports transformers, which a caller may not need loaded yet.
    from core.training.counting_trainer import CountingTrainer

    cfg = spec.training
    held_out, eval_note = eval_sample(spec, eval_items or [])
    notes: list[str] = [eval_note] if eval_note else []
    pad_id = padding_id(loaded.tokenizer)
    data = _layout(spec, loaded, items, held_out, layout=layout, pad_id=pad_id)
    args = training_arguments(
        spec, loaded, output_dir=output_dir, notes=notes, rows_per_step=data.rows_per_step
    )

    no_kv_cache(loaded.model)
    trainer = CountingTrainer(
        model=loaded.model,
        args=args,
        train_dataset=data.rows,
        data_collator=data.collator,
        sink=sink,
        meter=StepMeter(),
        engine=loaded.engine,
        save_total_limit=cfg.save_total_limit,
        sampler=data.sampler,
    )
    run = TrainingRun(spec, trainer, sink, data.eval_batches)
    run.train(resume_from)
    return run.outcome(loaded.model, notes)
