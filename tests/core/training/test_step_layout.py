"""Unpacked jobs train each optimizer step as padding-free rows: the same examples per step, the
same loss and the same LoRA gradients as the recipe's padded 2 x 4 micro-batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.data.conversations import to_examples
from core.data.sources import load_rows
from core.data.tokenize import IGNORE_INDEX, Encoded, encode_all
from core.spec import DatasetSection, JobSpec
from core.training.packing import StepSampler, step_rows


def _items(lengths: list[int]) -> list[Encoded]:
    return [Encoded([n] * n, [n] * n, False) for n in lengths]


def test_step_rows_keep_the_recipes_steps_within_the_micro_batch_budget() -> None:
    lengths = [30, 5, 9, 3, 7, 8, 2, 6, 25, 4, 11, 13, 17, 1, 12, 10, 14, 16, 20]
    items = _items(lengths)
    rows, per_step = step_rows(items, examples_per_step=8, capacity=40, seed=3)
    assert all(len(r["input_ids"]) <= 40 for r in rows)
    steps = [rows[i : i + per_step] for i in range(0, 2 * per_step, per_step)] + [
        rows[2 * per_step :]
    ]
    # Three steps (19 examples, 8 a step), each example in exactly one step, 8 per full step.
    assert [sum(len(r["seq_lengths"]) for r in step) for step in steps] == [8, 8, 3]
    assert sorted(n for r in rows for n in r["seq_lengths"]) == sorted(lengths)
    assert step_rows(items, examples_per_step=8, capacity=40, seed=3) == (rows, per_step)


def test_one_row_per_step_when_the_step_fits() -> None:
    rows, per_step = step_rows(_items([5] * 16), examples_per_step=8, capacity=4096, seed=0)
    assert per_step == 1 and [len(r["seq_lengths"]) for r in rows] == [8, 8]


def test_step_sampler_keeps_each_steps_rows_together_and_the_short_step_last() -> None:
    sampler = StepSampler(11, rows_per_step=3, seed=5)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(11)) and order[-2:] == [9, 10]
        blocks = [order[i : i + 3] for i in range(0, 9, 3)]
        assert all(b == list(range(b[0], b[0] + 3)) and b[0] % 3 == 0 for b in blocks)
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # a new order each epoch


def _spec(model_dir: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model_config": {
                "base_model": str(model_dir),
                "max_seq_length": 256,
                "load_in_4bit": False,
            },
            "lora_config": {"lora_dropout": 0, "use_gradient_checkpointing": False},
            "training_config": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 4,
                "max_steps": 1,
                "warmup_steps": 0,
                "optim": "adamw_torch",
                "save_steps": 0,
            },
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("budget_gib", [15.0, 0.0], ids=["one-row-a-step", "recipe-micro-batch"])
def test_step_rows_give_the_recipes_loss_and_lora_gradients(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget_gib: float
) -> None:
    import torch

    from core.training import engines, trainer
    from core.training.sink import ListSink
    from core.training.sink_callback import SinkCallback

    spec = _spec(model_dir)
    torch.manual_seed(0)
    loaded = engines.load(spec, str(model_dir))
    # 0 GiB: rows keep to the recipe's micro-batch (2 x 256 tokens), so the step takes several.
    monkeypatch.setattr(trainer, "FOLD_BUDGET_GIB", budget_gib)
    rows = load_rows(DatasetSection(name="sample:medical_qa", max_samples=8))
    examples = to_examples(rows, system_prompt="Be brief.", input_field="prompt").examples
    items = encode_all(loaded.tokenizer, examples, max_length=256).items
    assert len(items) == 8 and len({len(i.input_ids) for i in items}) > 1  # padding happens
    # A trained first label would be counted by the padded layout and not by the packed rows.
    assert all(i.labels[0] == IGNORE_INDEX for i in items)
    capacity = trainer.row_capacity(spec, loaded, items)
    rows, per_step = step_rows(items, examples_per_step=8, capacity=capacity, seed=42)
    assert per_step == (1 if budget_gib else len(rows)) and (budget_gib or per_step > 1)
    lora = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in lora.items()}
    grads: dict[str, dict[str, Any]] = {}

    def capture(self: SinkCallback, args: Any, state: Any, control: Any, **kw: Any) -> None:
        grads[layout] = {n: p.grad.detach().clone() for n, p in lora.items()}

    monkeypatch.setattr(SinkCallback, "on_pre_optimizer_step", capture, raising=False)
    losses = {}
    for layout in ("padded", "steps"):
        with torch.no_grad():  # the same LoRA weights before each run's one step
            for n, p in lora.items():
                p.copy_(start[n])
        sink = ListSink()
        outcome = trainer.train(
            spec, loaded, items, output_dir=tmp_path / layout, sink=sink, layout=layout
        )
        assert outcome.steps == 1
        losses[layout] = sink.rows[0]["loss"]
        assert sink.rows[0]["samples_per_second"] > 0
    assert losses["steps"] == pytest.approx(losses["padded"], rel=1e-5)
    for name, grad in grads["padded"].items():
        torch.testing.assert_close(grads["steps"][name], grad, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in grads["steps"].values())
