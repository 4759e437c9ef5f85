"""No job is lost between the database and the broker: the reconciler sends what never left."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from core.queue import RUN_JOB_TASK
from core.settings import Settings
from core.store import jobs
from core.store.db import session_scope
from core.store.models import Job, utcnow
from tests.api.in_process import Api
from worker.reconciler import reconcile_once


@dataclass
class RecordingApp:
    sent: list[tuple[str, list[Any], str]] = field(default_factory=list)

    def send_task(self, name: str, *, args: list[Any], queue: str) -> None:
        self.sent.append((name, args, queue))


def _settings(api: Api) -> Settings:
    return Settings(
        _env_file=None,
        database_url=api.db_url,
        reconcile_interval_s=0.001,  # type: ignore[call-arg]
        resend_queued_after_s=600,
    )


def test_broker_down_at_submit_keeps_the_job_and_the_reconciler_sends_it(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broker_down(*_: Any, **__: Any) -> None:
        raise ConnectionError("redis is restarting")

    monkeypatch.setattr(api.queue, "send_task", broker_down)
    created = api.client.post(
        "/jobs",
        json={
            "training_dataset": {"name": "sample:medical_qa"},
            "model_config": {"base_model": "smollm2-135m-instruct"},
        },
    )
    assert created.status_code == 201 and created.json()["status"] == "queued"
    job_id = created.json()["id"]
    app = RecordingApp()
    assert reconcile_once(app, _settings(api)) == [job_id]
    assert app.sent == [(RUN_JOB_TASK, [job_id], "medtune.train")]
    assert reconcile_once(app, _settings(api)) == []  # stamped: not sent twice
    with session_scope(api.db_url) as s:
        assert jobs.get_job(s, job_id).enqueued_at is not None


def test_sent_jobs_are_left_alone_until_the_broker_may_have_lost_them(api: Api) -> None:
    job_id = api.create()["id"]  # the fake broker took it: stamped
    app = RecordingApp()
    assert reconcile_once(app, _settings(api)) == []
    with session_scope(api.db_url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.enqueued_at is not None
        job.enqueued_at = utcnow() - timedelta(minutes=11)  # e.g. Redis restarted since
        s.add(job)
        s.commit()
    assert reconcile_once(app, _settings(api)) == [job_id]


def test_a_lost_worker_s_job_is_requeued_and_sent_in_one_pass(api: Api) -> None:
    job_id = api.create()["id"]
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job_id, worker="dead", lease_s=60)
        job = s.get(Job, job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
        s.add(job)
        s.commit()
    app = RecordingApp()
    assert reconcile_once(app, _settings(api)) == [job_id]
    with session_scope(api.db_url) as s:
        assert jobs.get_job(s, job_id).status == "queued"
