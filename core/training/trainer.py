"""Run training with the spec's training_config, reporting each logging step to a sink."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.data.tokenize import IGNORE_INDEX, Encoded
from core.spec import JobSpec
from core.training import checkpoints
from core.training.engines import Loaded
from core.training.meter import StepMeter, memory_mb
from core.training.packing import GroupedCollator, PackedCollator, group_by_length, pack
from core.training.sink import MetricsSink

# 8-bit and paged optimizers live in bitsandbytes' CUDA kernels.
_CUDA_ONLY_OPTIMS = {"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"}


@dataclass
class TrainOutcome:
    steps: int
    total_steps: int
    cancelled: bool
    final_loss: float | None
    notes: list[str]


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


def train(
    spec: JobSpec,
    loaded: Loaded,
    items: list[Encoded],
    *,
    output_dir: Path,
    sink: MetricsSink,
    resume_from: Path | None = None,
    eval_items: list[Encoded] | None = None,
) -> TrainOutcome:
    """Train to the spec's end (or a cancel), checkpointing into ``output_dir/checkpoints``.

    ``resume_from`` restores optimizer, scheduler, RNG and data position from a checkpoint.
    ``eval_items`` (the held-out split) are scored every ``eval_steps`` and at the end; the
    eval loss goes into the metric row of the step it was measured at. The sink is flushed
    before every checkpoint and when training stops, however it stops.
    """
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    notes: list[str] = []
    cfg = spec.training
    fp16, bf16 = _precision(spec, notes)
    tokenizer = loaded.tokenizer
    # Any id will do for padding (its labels are ignored); Llama 3 ships no pad token.
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    collator: Any
    capacity = cfg.per_device_train_batch_size * spec.model.max_seq_length
    if cfg.packing and cfg.packing_mode == "padding_free":
        collator = PackedCollator()
    elif cfg.packing:
        collator = GroupedCollator(pad_id)
    else:
        collator = PadCollator(pad_id)
    dataset = _rows(spec, items, capacity=capacity)
    # The held-out split is batched and collated exactly as the training data.
    micro_batch = 1 if cfg.packing else cfg.per_device_train_batch_size
    eval_rows = _rows(spec, eval_items or [], capacity=capacity)
    eval_batches = [
        collator(eval_rows[i : i + micro_batch]) for i in range(0, len(eval_rows), micro_batch)
    ]
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=1 if cfg.packing else cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
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
        gradient_checkpointing=bool(spec.lora.use_gradient_checkpointing)
        and loaded.engine != "unsloth",  # Unsloth wires its own checkpointing into the model
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or None,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )

    class SinkCallback(TrainerCallback):
        cancelled = False
        last_loss: float | None = None
        pending_eval: float | None = None  # measured at on_step_end, sent with that step's log
        meter = StepMeter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            sink.begin(state.max_steps)
            self.meter.start(step=state.global_step, tokens=trainer.tokens, samples=trainer.samples)

        def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            _maybe_inject_oom(state.global_step + 1)

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if eval_batches and _eval_due(spec, state.global_step, state.max_steps):
                started = time.perf_counter()
                eval_loss = trainer.held_out_loss(eval_batches)
                self.meter.pause(time.perf_counter() - started)  # not a training step's time
                if control.should_log:  # the row this step logs next carries it
                    self.pending_eval = eval_loss
                else:
                    sink.log(state.global_step, {"eval_loss": eval_loss})
            if sink.should_stop():
                self.cancelled = True
                control.should_training_stop = True
                control.should_save = True  # a cancelled job keeps a usable checkpoint

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if not logs or "loss" not in logs:
                return  # the end-of-training summary carries train_loss only
            allocated, reserved, peak = memory_mb()
            self.last_loss = float(logs["loss"])
            values: dict[str, float | None] = {
                "loss": self.last_loss,
                "learning_rate": _num(logs.get("learning_rate")),
                "grad_norm": _num(logs.get("grad_norm")),
                "epoch": _num(logs.get("epoch")),
                **self.meter.row(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    tokens=trainer.tokens,
                    samples=trainer.samples,
                ),
                "memory_mb": allocated,
                "reserved_memory_mb": reserved,
                "peak_memory_mb": peak,
            }
            if self.pending_eval is not None:
                values["eval_loss"], self.pending_eval = self.pending_eval, None
            sink.log(state.global_step, values)

    checkpoint_root = checkpoints.checkpoint_dir(output_dir)
    staging = checkpoint_root / checkpoints.STAGING

    class CountingTrainer(Trainer):
        """Counts real tokens where they are trained (the data loader prefetches ahead), and
        writes checkpoints into a staging folder that is renamed into place when complete."""

        tokens = 0
        samples = 0

        def _get_output_dir(self, trial: Any) -> str:
            return str(staging)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            started = time.perf_counter()
            # Metrics first: a checkpoint is never ahead of the stored rows, so a run resumed
            # from it neither loses nor repeats a step.
            sink.flush()
            shutil.rmtree(staging, ignore_errors=True)
            super()._save_checkpoint(model, trial)
            checkpoints.publish(staging / f"checkpoint-{self.state.global_step}", checkpoint_root)
            checkpoints.prune(checkpoint_root, keep=cfg.save_total_limit)
            callback.meter.pause(time.perf_counter() - started)

        def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            # The collators report real (non-padding) tokens and examples under "_" keys.
            self.tokens += int(inputs["_real_tokens"])
            self.samples += int(inputs["_samples"])
            return super().training_step(model, self.model_inputs(inputs), *args, **kwargs)

        def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
            drop = {"_real_tokens", "_samples"}
            if loaded.engine != "unsloth":
                drop.add("packed_seq_lengths")  # transformers reads boundaries from position_ids
            return {k: v for k, v in inputs.items() if k not in drop}

        def held_out_loss(self, batches: list[dict[str, Any]]) -> float | None:
            """Mean loss per trained token of the held-out batches, computed as in training."""
            model, total, count = self.model, 0.0, 0
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for batch in batches:
                        # The loss is a mean over the batch's shifted labels: weight it by them.
                        tokens = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
                        if not tokens:
                            continue
                        inputs = self._prepare_inputs(self.model_inputs(batch))
                        with self.compute_loss_context_manager():
                            loss = self.compute_loss(model, inputs)
                        total += float(loss.detach()) * tokens
                        count += tokens
            finally:
                model.train(was_training)
            return _num(total / count) if count else None

    # Training needs no KV cache, and with one transformers would not mask packed rows per example.
    loaded.model.config.use_cache = False
    callback = SinkCallback()
    trainer = CountingTrainer(
        model=loaded.model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the sink reports; no raw dicts on stdout
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        # Keep the rows up to the failure; a failed write must not hide the training error.
        with contextlib.suppress(Exception):
            sink.flush()
        raise
    if callback.pending_eval is not None:  # measured at a step that logged no row
        sink.log(trainer.state.global_step, {"eval_loss": callback.pending_eval})
    sink.flush()
    return TrainOutcome(
        steps=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        cancelled=callback.cancelled,
        final_loss=callback.last_loss,
        notes=notes,
    )


# Fault injection for tests: a CUDA out-of-memory error at this step, once per process.
FAULT_OOM_ENV = "MEDTUNE_FAULT_OOM_AT_STEP"
_injected: set[int] = set()


def _maybe_inject_oom(step: int) -> None:
    wanted = os.environ.get(FAULT_OOM_ENV)
    if wanted and int(wanted) == step and step not in _injected:
        import torch

        _injected.add(step)
        raise torch.cuda.OutOfMemoryError(f"injected by {FAULT_OOM_ENV} at step {step}")


def _eval_due(spec: JobSpec, step: int, total_steps: int) -> bool:
    """Whether the held-out loss is measured after this optimizer step."""
    cfg = spec.training
    if cfg.eval_strategy == "no":
        return False
    if step >= total_steps:
        return True
    if cfg.eval_strategy == "end":
        return False
    every = cfg.eval_steps or max(1, total_steps // 10)
    return step % every == 0


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
