"""The OpenAI fine-tuning shapes (core/openai_shapes.py): requests mapped onto a job spec, jobs
and events mapped back, without the API around them (tests/api/test_openai_ft.py has that)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core import openai_shapes as shapes
from core.store.models import Job, JobStatus, MetricRow
from tests.helpers import recipe_spec

SMOL = "smollm2-135m-instruct"


def make_job(**values: Any) -> Job:
    spec = recipe_spec("sample:medical_qa")
    defaults: dict[str, Any] = {
        "id": "job_x",
        "base_model": SMOL,
        "finetuned_model": "m",
        "spec": spec,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    return Job(**{**defaults, **values})


def test_spec_from_request_auto_leaves_the_recipe_alone() -> None:
    spec = shapes.spec_from_request(
        model="unsloth/llama-3-8b-Instruct-bnb-4bit",
        training_file="data/qa.jsonl",
        hyperparameters={"n_epochs": "auto", "batch_size": "auto"},
    )
    assert spec == {
        "model_config": {
            "base_model": "unsloth/llama-3-8b-Instruct-bnb-4bit",
            "finetuned_model": "llama-3-8b-Instruct-bnb-4bit-ft",
        },
        "training_dataset": {"name": "data/qa.jsonl"},
    }


@pytest.mark.parametrize(
    ("batch_size", "micro", "expected"),
    [(8, None, (2, 4)), (3, None, (3, 1)), (1, None, (1, 1)), (12, 4, (4, 3)), (4, 4, (4, 1))],
)
def test_batch_size_is_the_effective_batch(
    batch_size: int, micro: int | None, expected: tuple[int, int]
) -> None:
    medtune = {"training_config": {"per_device_train_batch_size": micro}} if micro else None
    spec = shapes.spec_from_request(
        model=SMOL,
        training_file="sample:medical_qa",
        hyperparameters={"batch_size": batch_size},
        medtune=medtune,
    )
    training = spec["training_config"]
    got = (training["per_device_train_batch_size"], training["gradient_accumulation_steps"])
    assert got == expected
    assert shapes.hyperparameters_of(spec)["batch_size"] == batch_size


def test_batch_size_below_the_asked_micro_batch_is_a_conflict() -> None:
    with pytest.raises(shapes.ConflictingFields) as caught:
        shapes.spec_from_request(
            model=SMOL,
            training_file="sample:medical_qa",
            hyperparameters={"batch_size": 2},
            medtune={"training_config": {"per_device_train_batch_size": 4}},
        )
    assert caught.value.field == "medtune.training_config.per_device_train_batch_size"


def test_spec_from_request_does_not_change_its_input() -> None:
    medtune = {"training_config": {"max_steps": 5}}
    shapes.spec_from_request(model=SMOL, training_file="x.jsonl", seed=1, medtune=medtune)
    assert medtune == {"training_config": {"max_steps": 5}}


def test_spec_from_request_maps_validation_file() -> None:
    spec = shapes.spec_from_request(model=SMOL, training_file="t.jsonl", validation_file="v.jsonl")
    assert spec["validation_dataset"] == {"name": "v.jsonl"}
    merged = shapes.spec_from_request(
        model=SMOL,
        training_file="t.jsonl",
        validation_file="v.jsonl",
        medtune={"validation_dataset": {"max_samples": 3}},
    )
    assert merged["validation_dataset"] == {"max_samples": 3, "name": "v.jsonl"}
    null = shapes.spec_from_request(
        model=SMOL,
        training_file="t.jsonl",
        validation_file="v.jsonl",
        medtune={"validation_dataset": None},
    )
    assert null["validation_dataset"] == {"name": "v.jsonl"}
    assert "validation_dataset" not in shapes.spec_from_request(model=SMOL, training_file="t")
    with pytest.raises(shapes.ConflictingFields) as caught:
        shapes.spec_from_request(
            model=SMOL,
            training_file="t.jsonl",
            validation_file="v.jsonl",
            medtune={"validation_dataset": {"name": "w.jsonl"}},
        )
    assert caught.value.field == "medtune.validation_dataset.name"


def test_validation_errors_name_validation_file_when_it_was_sent() -> None:
    for field in ("validation_dataset", "validation_dataset.name"):
        assert shapes.request_field(field, validation_file="v.jsonl") == "validation_file"
        assert shapes.request_field(field) == f"medtune.{field}"
    assert shapes.request_field("validation_dataset.columns", validation_file="v.jsonl") == (
        "medtune.validation_dataset.columns"
    )


def test_job_object_shows_the_validation_file_and_its_errors() -> None:
    spec = recipe_spec("sample:medical_qa")
    spec["validation_dataset"] = {"name": "file-abc"}
    assert shapes.job_object(make_job(spec=spec))["validation_file"] == "file-abc"
    spec["validation_dataset"] = None  # as a stored spec without one says
    assert shapes.job_object(make_job(spec=spec))["validation_file"] is None
    failed = make_job(
        status=JobStatus.failed,
        error_code="dataset_not_found",
        error_message="validation_dataset: uploaded file 'file-abc' does not exist",
    )
    assert shapes.job_error(failed) == {
        "code": "dataset_not_found",
        "message": "validation_dataset: uploaded file 'file-abc' does not exist",
        "param": "validation_file",
    }
    training = make_job(status=JobStatus.failed, error_code="dataset_not_found")
    assert shapes.job_error(training)["param"] == "training_file"  # type: ignore[index]


def test_request_field_names_where_the_value_came_from() -> None:
    hp = {"n_epochs": 2, "batch_size": "auto"}
    assert shapes.request_field("training_dataset.name") == "training_file"
    assert shapes.request_field("model_config.base_model") == "model"
    assert shapes.request_field("training_config.num_train_epochs", hyperparameters=hp) == (
        "hyperparameters.n_epochs"
    )
    assert shapes.request_field(
        "training_config.per_device_train_batch_size", hyperparameters=hp
    ) == ("medtune.training_config.per_device_train_batch_size")
    assert shapes.request_field("lora_config.r") == "medtune.lora_config.r"


def test_default_finetuned_name_is_a_valid_name() -> None:
    assert shapes.default_finetuned_name("./models/My Model@v2/") == "My-Model-v2-ft"
    assert len(shapes.default_finetuned_name("a" * 300)) == 96


def test_estimated_finish_from_the_step_rate() -> None:
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    rows = [
        MetricRow(job_id="job_x", step=n, created_at=start + timedelta(seconds=2 * n))
        for n in range(1, 11)
    ]
    job = make_job(status=JobStatus.running, steps_done=10, steps_total=100)
    # 2 s a step, 90 steps left after step 10 (at start + 20 s).
    expected = int((start + timedelta(seconds=20 + 180)).timestamp())
    assert shapes.estimated_finish(job, rows) == expected
    naive = [
        MetricRow(job_id="job_x", step=r.step, created_at=r.created_at.replace(tzinfo=None))
        for r in rows
    ]
    assert shapes.estimated_finish(job, naive) == expected  # SQLite's naive stamps are UTC
    assert shapes.estimated_finish(job, rows[:1]) is None
    assert (
        shapes.estimated_finish(make_job(status=JobStatus.succeeded, steps_total=100), rows) is None
    )


def test_job_object_status_and_model() -> None:
    for status in JobStatus:
        obj = shapes.job_object(make_job(status=status, finetuned_model="tuned"))
        assert obj["status"] == status.value
        assert obj["fine_tuned_model"] == ("tuned" if status == JobStatus.succeeded else None)
    assert shapes.job_object(make_job())["created_at"] == int(
        datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    )


def test_events_page_bounds() -> None:
    job = make_job(
        status=JobStatus.cancelled,
        started_at=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        finished_at=datetime(2026, 1, 1, 0, 2, tzinfo=UTC),
        steps_done=2,
        steps_total=10,
    )
    rows = [MetricRow(job_id="job_x", step=n, loss=1.0, created_at=job.started_at) for n in (2, 1)]
    events, more = shapes.events_page(job, rows, after=None, limit=10)
    assert [e["id"][len("ftevent-job_x-") :] for e in events] == [
        "finished",
        "step-2",
        "step-1",
        "started",
        "created",
    ]
    assert events[0]["level"] == "warn" and not more
    assert shapes.metrics_before(shapes.event_key("job_x", "ftevent-job_x-step-2")) == 2
    assert shapes.metrics_before(shapes.event_key("job_x", "ftevent-job_x-finished")) is None
    assert shapes.metrics_before(shapes.event_key("job_x", "ftevent-job_x-started")) == 0
    after_started, _ = shapes.events_page(job, [], after="ftevent-job_x-started", limit=10)
    assert [e["id"] for e in after_started] == ["ftevent-job_x-created"]
    with pytest.raises(shapes.InvalidEventId):
        shapes.event_key("job_x", "ftevent-job_x-step-two")
