"""Early stopping and keep best: the callback's rules on given losses, then a real SmolLM2 run
that stops early and keeps its best evaluation's weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.data.conversations import to_examples
from core.data.sources import load_rows
from core.data.tokenize import encode_all
from core.spec import DatasetSection, JobSpec
from core.training.early_stopping import EarlyStopping
from core.training.sink import ListSink
from tests.core.training.test_metrics_training import _held_out_loss
from tests.helpers import recipe_spec


def spec_with(**training: Any) -> JobSpec:
    spec = recipe_spec("sample:medical_qa", **training)
    spec["training_dataset"]["validation_share"] = 0.2
    return JobSpec.model_validate(spec)


def run(stopper: EarlyStopping, losses: list[float]) -> list[int]:
    """Feed one evaluation per step; returns the steps at which it asked training to stop."""
    metrics = stopper.metrics
    stops = []
    for step, loss in enumerate(losses, start=1):
        metrics.last_eval = (step, loss)
        control = SimpleNamespace(should_training_stop=False)
        stopper.on_step_end(None, None, control, model=SimpleNamespace(named_parameters=list))
        if control.should_training_stop:
            stops.append(step)
    return stops


def test_patience_counts_evaluations_without_an_improvement_beyond_min_delta() -> None:
    spec = spec_with(early_stopping={"patience": 2, "min_delta": 0.05}, keep="best")
    stopper = EarlyStopping(spec, SimpleNamespace(last_eval=None))
    # 1.47 and 1.28 are lower than the best, but not by more than min_delta: no improvement
    assert run(stopper, [2.0, 1.5, 1.47, 1.3, 1.28, 1.29]) == [6]
    assert stopper.best == (4, 1.3)
    assert stopper.finish(object(), final_step=6, cancelled=False) == ("early_stopping", 4)


@pytest.mark.parametrize(
    ("training", "reason", "kept"),
    [
        ({"max_steps": 4}, "max_steps", 4),
        ({"max_steps": 0, "num_train_epochs": 1}, "epochs", 4),
        ({"max_steps": 4, "early_stopping": {"patience": 5}}, "max_steps", 4),
    ],
)
def test_reasons_and_kept_step(training: dict[str, Any], reason: str, kept: int) -> None:
    stopper = EarlyStopping(spec_with(**training), SimpleNamespace(last_eval=None))
    assert run(stopper, [2.0, 1.0, 1.5, 1.6]) == []
    assert stopper.finish(object(), final_step=4, cancelled=False) == (reason, kept)
    assert stopper.finish(object(), final_step=4, cancelled=True) == ("cancelled", kept)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_real_run_stops_early_and_keeps_its_best_weights(model_dir: Path, tmp_path: Path) -> None:
    from core.training import engines, trainer

    spec = JobSpec.model_validate(
        {
            "model_config": {"base_model": str(model_dir), "max_seq_length": 256},
            "lora_config": {"use_gradient_checkpointing": False},
            "training_dataset": {"name": "sample:medical_qa", "validation_share": 0.2},
            "training_config": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "warmup_steps": 0,
                "max_steps": 12,
                # far too high on purpose: the held-out loss falls, then climbs
                "learning_rate": 3e-2,
                "optim": "adamw_torch",
                "save_steps": 0,
                "eval_steps": 1,
                "early_stopping": {"patience": 2},
                "keep": "best",
            },
        }
    )
    loaded = engines.load(spec, str(model_dir))
    rows = load_rows(DatasetSection(name="sample:medical_qa", max_samples=14))
    examples = to_examples(rows, system_prompt="Be brief.", input_field="prompt").examples
    encoded = encode_all(loaded.tokenizer, examples, max_length=256).items
    train_items, eval_items = encoded[:10], encoded[10:]
    sink = ListSink()
    outcome = trainer.train(
        spec, loaded, train_items, output_dir=tmp_path / "out", sink=sink, eval_items=eval_items
    )
    evals = [(r["step"], r["eval_loss"]) for r in sink.rows if r.get("eval_loss") is not None]
    assert evals[0][0] == 0  # the held-out loss before training, then after each step
    evals = evals[1:]
    best_step, best_loss = min(evals, key=lambda e: (e[1], e[0]))
    assert outcome.stop_reason == "early_stopping", evals
    assert outcome.steps < 12 and outcome.steps == best_step + 2, evals
    assert outcome.kept_step == best_step
    # The adapter now holds the best evaluation's weights, not the last step's.
    assert _held_out_loss(loaded.model, eval_items) == pytest.approx(best_loss, rel=1e-3)
    assert evals[-1][1] > best_loss
