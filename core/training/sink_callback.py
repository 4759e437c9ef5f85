"""Reports each logging step of a CountingTrainer to the job's metrics sink, with the held-out
loss, throughput and memory, and stops training when the job is cancelled."""

from __future__ import annotations

import os
import time
from typing import Any

from transformers import TrainerCallback

from core.spec import JobSpec
from core.training.counting_trainer import CountingTrainer, finite
from core.training.meter import memory_mb
from core.training.sink import MetricsSink


class SinkCallback(TrainerCallback):
    def __init__(
        self,
        spec: JobSpec,
        sink: MetricsSink,
        trainer: CountingTrainer,
        eval_batches: list[dict[str, Any]],
    ) -> None:
        self.spec = spec
        self.sink = sink
        self.trainer = trainer
        self.eval_batches = eval_batches
        self.cancelled = False
        self.last_loss: float | None = None
        self.pending_eval: float | None = None  # measured at on_step_end, sent with that step's log
        self.last_eval: tuple[int, float] | None = None  # (step, loss), for early stopping

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.sink.begin(state.max_steps)
        t = self.trainer
        if (
            self.eval_batches
            and state.global_step == 0
            and self.spec.training.eval_strategy != "no"
        ):
            # The held-out loss before any training (a fresh LoRA adds nothing: the base's own),
            # as step 0: the yardstick that says whether tuning helps on held-out data at all.
            self.sink.log(0, {"eval_loss": t.held_out_loss(self.eval_batches)})
        t.meter.start(step=state.global_step, tokens=t.tokens, samples=t.samples)

    def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        maybe_inject_oom(state.global_step + 1)

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.eval_batches and eval_due(self.spec, state.global_step, state.max_steps):
            started = time.perf_counter()
            eval_loss = self.trainer.held_out_loss(self.eval_batches)
            self.trainer.meter.pause(time.perf_counter() - started)  # not a training step's time
            self.last_eval = (state.global_step, eval_loss)
            if control.should_log:  # the row this step logs next carries it
                self.pending_eval = eval_loss
            else:
                self.sink.log(state.global_step, {"eval_loss": eval_loss})
        if self.sink.should_stop():
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = True  # a cancelled job keeps a usable checkpoint

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if not logs or "loss" not in logs:
            return  # the end-of-training summary carries train_loss only
        allocated, reserved, peak = memory_mb()
        self.last_loss = float(logs["loss"])
        t = self.trainer
        values: dict[str, float | None] = {
            "loss": self.last_loss,
            "learning_rate": finite(logs.get("learning_rate")),
            "grad_norm": finite(logs.get("grad_norm")),
            "epoch": finite(logs.get("epoch")),
            **t.meter.row(
                step=state.global_step,
                total_steps=state.max_steps,
                tokens=t.tokens,
                samples=t.samples,
            ),
            "memory_mb": allocated,
            "reserved_memory_mb": reserved,
            "peak_memory_mb": peak,
        }
        if self.pending_eval is not None:
            values["eval_loss"], self.pending_eval = self.pending_eval, None
        self.sink.log(state.global_step, values)


def eval_due(spec: JobSpec, step: int, total_steps: int) -> bool:
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


# Fault injection for tests: a CUDA out-of-memory error at this step, once per process.
FAULT_OOM_ENV = "MEDTUNE_FAULT_OOM_AT_STEP"
_injected: set[int] = set()


def maybe_inject_oom(step: int) -> None:
    wanted = os.environ.get(FAULT_OOM_ENV)
    if wanted and int(wanted) == step and step not in _injected:
        import torch

        _injected.add(step)
        raise torch.cuda.OutOfMemoryError(f"injected by {FAULT_OOM_ENV} at step {step}")
