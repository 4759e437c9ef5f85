"""transformers' Trainer, counting the real tokens it trains and publishing checkpoints whole."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from core.data.tokenize import IGNORE_INDEX
from core.training import checkpoints
from core.training.meter import StepMeter
from core.training.sink import MetricsSink

# Keys the collators add for counting; the model never sees them.
COUNT_KEYS = frozenset({"_real_tokens", "_samples"})


class CountingTrainer(Trainer):
    """Counts real tokens where they are trained (the data loader prefetches ahead), and writes
    checkpoints into a staging folder that is renamed into place when complete."""

    def __init__(
        self,
        *args: Any,
        sink: MetricsSink,
        meter: StepMeter,
        engine: str,
        save_total_limit: int | None,
        sampler: Any | None = None,
        **kwargs: Any,
    ) -> None:
        self.step_sampler = sampler
        super().__init__(*args, **kwargs)
        self.sink = sink
        self.meter = meter
        self.engine = engine
        self.save_total_limit = save_total_limit
        self.tokens = 0
        self.samples = 0
        self.checkpoint_root = checkpoints.checkpoint_dir(Path(self.args.output_dir))
        self.staging = self.checkpoint_root / checkpoints.STAGING

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # step_rows' rows must stay grouped by step; the stock sampler shuffles rows one by one.
        if self.step_sampler is not None:
            return self.step_sampler
        return super()._get_train_sampler(train_dataset)

    def _get_output_dir(self, trial: Any) -> str:
        return str(self.staging)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        started = time.perf_counter()
        # Metrics first: a checkpoint is never ahead of the stored rows, so a run resumed
        # from it neither loses nor repeats a step.
        self.sink.flush()
        shutil.rmtree(self.staging, ignore_errors=True)
        super()._save_checkpoint(model, trial)
        checkpoints.publish(
            self.staging / f"checkpoint-{self.state.global_step}", self.checkpoint_root
        )
        checkpoints.prune(self.checkpoint_root, keep=self.save_total_limit)
        self.meter.pause(time.perf_counter() - started)

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # The collators report real (non-padding) tokens and examples under "_" keys.
        self.tokens += int(inputs["_real_tokens"])
        self.samples += int(inputs["_samples"])
        return super().training_step(model, self.model_inputs(inputs), *args, **kwargs)

    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        drop = set(COUNT_KEYS)
        if self.engine != "unsloth":
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
        return finite(total / count) if count else None


def finite(value: Any) -> float | None:
    """A float for a metric row; None for a missing, infinite or NaN value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
