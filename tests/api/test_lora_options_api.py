"""LoRA options refused at submit, with nothing stored: LoftQ where it cannot run."""

from __future__ import annotations

from sqlmodel import Session, select

from core.store.db import get_engine
from core.store.models import Job
from tests.api.in_process import Api, assert_problem
from tests.api.in_process import api as api  # the in-process API fixture
from tests.helpers import recipe_spec


def _spec(**model: object) -> dict:
    spec = recipe_spec("sample:medical_qa")
    spec["model_config"].update(model)
    spec["lora_config"] = {"loftq_config": {"loftq_bits": 4}}
    return spec


def test_loftq_on_a_4bit_base_is_a_422(api: Api) -> None:
    response = api.client.post("/jobs", json=_spec(load_in_4bit=True))
    body = assert_problem(response, 422, "invalid_value", "lora_config")
    assert "load_in_4bit" in body["detail"]


def test_loftq_routed_to_cpu_workers_is_refused_and_nothing_stored(api: Api) -> None:
    response = api.client.post("/jobs", json=_spec(load_in_4bit=False))
    body = assert_problem(response, 422, "loftq_needs_cuda", "lora_config.loftq_config")
    assert "GPU worker" in body["detail"]
    with Session(get_engine(api.db_url)) as s:
        assert s.exec(select(Job)).all() == []
    assert api.queue.calls == []
