"""Early stopping and the best checkpoint: ``training_config.early_stopping`` and ``keep``.

A TrainerCallback that reads each held-out loss the metrics callback (SinkCallback) measured,
remembers the best one (lower by more than ``min_delta`` than the best so far), stops training
once ``patience`` evaluations in a row brought no such improvement, and with ``keep: "best"``
restores the best evaluation's LoRA weights at the end, so they become the adapter. It says
why training stopped (``stop_reason``) and which step's weights were kept (``kept_step``).

The best weights are a CPU copy of the trainable (LoRA) tensors only: a few MB for the recipe's
adapter. They live in memory, so a job resumed after a lost worker tracks the best again from
its checkpoint on.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from core.spec import JobSpec


class EarlyStopping(TrainerCallback):
    """Added after SinkCallback, whose ``last_eval`` (step, loss) it reads at each step's end."""

    def __init__(self, spec: JobSpec, metrics: Any) -> None:
        self.spec = spec
        self.metrics = metrics
        self.best: tuple[int, float] | None = None
        self.best_weights: dict[str, Any] | None = None
        self.bad_evals = 0
        self.stopped = False
        self._seen_step = -1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        measured = getattr(self.metrics, "last_eval", None)
        if measured is None or measured[0] == self._seen_step:
            return
        step, loss = measured
        self._seen_step = step
        cfg = self.spec.training
        margin = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
        if self.best is None or loss < self.best[1] - margin:
            self.best, self.bad_evals = (step, loss), 0
            if cfg.keep == "best":
                self.best_weights = _trainable_copy(kwargs["model"])
            return
        self.bad_evals += 1
        if cfg.early_stopping and self.bad_evals >= cfg.early_stopping.patience:
            self.stopped = True
            control.should_training_stop = True

    def finish(self, model: Any, *, final_step: int, cancelled: bool) -> tuple[str, int]:
        """(stop_reason, kept_step); with keep "best", the best weights go back into ``model``."""
        if cancelled:
            reason = "cancelled"
        elif self.stopped:
            reason = "early_stopping"
        else:
            reason = "max_steps" if self.spec.training.max_steps > 0 else "epochs"
        if self.spec.training.keep == "best" and self.best:
            if self.best_weights and self.best[0] != final_step:
                _restore(model, self.best_weights)
            return reason, self.best[0]
        return reason, final_step


def _trainable_copy(model: Any) -> dict[str, Any]:
    return {
        name: param.detach().to("cpu", copy=True)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _restore(model: Any, weights: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
