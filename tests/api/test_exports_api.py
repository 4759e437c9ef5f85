"""POST /jobs/{id}/exports: queued for a succeeded job on its worker queue; clear errors else."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.queue import EXPORT_TASK, TRAIN_QUEUE
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.api.in_process import Api, assert_problem


def _succeeded(api: Api, tmp_path: Path, *, adapter: bool = True, **spec: object) -> str:
    job_id = api.create()["id"] if not spec else _create(api, **spec)
    folder = tmp_path / job_id / "adapter"
    folder.mkdir(parents=True)
    if adapter:
        (folder / "adapter_config.json").write_text("{}")
    with session_scope(api.db_url) as s:
        assert jobs.claim(s, job_id, worker="w")
        jobs.finish(
            s,
            job_id,
            JobStatus.succeeded,
            adapter_dir=str(folder),
            artifacts_dir=str(folder.parent),
        )
    api.queue.calls.clear()
    return job_id


def _create(api: Api, **top: object) -> str:
    from tests.helpers import recipe_spec

    response = api.client.post("/jobs", json={**recipe_spec("sample:medical_qa"), **top})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_export_is_queued_for_a_worker_and_echoed(api: Api, tmp_path: Path) -> None:
    job_id = _succeeded(api, tmp_path)
    body = {"formats": ["gguf", "merged_4bit", "gguf"], "gguf_quantizations": ["q8_0", "f16"]}
    response = api.client.post(f"/jobs/{job_id}/exports", json=body)
    assert response.status_code == 202, response.text
    assert response.json() == {
        "object": "export",
        "job_id": job_id,
        "status": "queued",
        "formats": ["gguf", "merged_4bit"],
        "gguf_quantizations": ["q8_0", "f16"],
        "push_to_hub": False,
        "artifacts": ["merged_4bit", "gguf_q8_0", "gguf_f16"],
    }
    [sent] = api.queue.calls
    assert sent.name == EXPORT_TASK
    assert sent.args == [job_id]
    assert sent.kwargs == {
        "formats": ["gguf", "merged_4bit"],
        "gguf_quantizations": ["q8_0", "f16"],
        "push_to_hub": False,
    }
    assert sent.options == {"queue": TRAIN_QUEUE}


def test_export_of_a_job_not_succeeded_is_409(api: Api) -> None:
    job_id = api.create()["id"]
    response = api.client.post(f"/jobs/{job_id}/exports", json={"formats": ["lora"]})
    assert_problem(response, 409, "job_not_ready", "job_id")
    assert api.queue.calls[-1].name != EXPORT_TASK


def test_export_of_a_job_without_adapter_is_409(api: Api, tmp_path: Path) -> None:
    job_id = _succeeded(api, tmp_path, adapter=False)
    response = api.client.post(f"/jobs/{job_id}/exports", json={"formats": ["gguf"]})
    body = assert_problem(response, 409, "adapter_missing", "job_id")
    assert "adapter_config.json" in body["detail"]
    assert api.queue.calls == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"formats": ["onnx"]}, "formats[0]"),
        ({"formats": []}, "formats"),
        ({"formats": ["gguf"], "gguf_quantizations": ["q2_k"]}, "gguf_quantizations[0]"),
        ({"formats": ["lora"], "colour": "red"}, "colour"),
    ],
)
def test_bad_export_requests_are_422_naming_the_field(
    api: Api, tmp_path: Path, body: dict[str, object], field: str
) -> None:
    job_id = _succeeded(api, tmp_path)
    response = api.client.post(f"/jobs/{job_id}/exports", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"].split(".")[0] == field
    assert api.queue.calls == []


def test_push_without_a_hub_username_is_refused_before_queueing(api: Api, tmp_path: Path) -> None:
    job_id = _succeeded(api, tmp_path, hugging_face_username=None)
    response = api.client.post(
        f"/jobs/{job_id}/exports", json={"formats": ["lora"], "push_to_hub": True}
    )
    assert_problem(response, 422, "hub_username_missing", "hugging_face_username")
    assert api.queue.calls == []


def test_push_with_a_username_is_queued(api: Api, tmp_path: Path) -> None:
    job_id = _succeeded(api, tmp_path, hugging_face_username="medtune-test")
    response = api.client.post(
        f"/jobs/{job_id}/exports", json={"formats": ["lora"], "push_to_hub": True}
    )
    assert response.status_code == 202, response.text
    assert api.queue.calls[0].kwargs["push_to_hub"] is True


def test_export_of_an_unknown_job_is_404(api: Api) -> None:
    response = api.client.post("/jobs/job_nope/exports", json={"formats": ["lora"]})
    assert_problem(response, 404, "job_not_found", "job_id")


def _real_adapter(folder: Path, model_dir: Path) -> None:
    from core.pipeline import _save_adapter
    from tests.core.export.export_helpers import fresh_lora

    _save_adapter(fresh_lora(model_dir), folder)


@pytest.mark.slow
def test_a_queued_export_runs_on_the_worker_and_is_listed(
    api: Api, tmp_path: Path, model_dir: Path, model_cache: Path
) -> None:
    pytest.importorskip("llama_cpp")
    from core.export.run import run_export

    job_id = _succeeded(api, tmp_path)
    _real_adapter(tmp_path / job_id / "adapter", model_dir)
    body = {"formats": ["lora", "gguf"], "gguf_quantizations": ["q4_k_m"]}
    assert api.client.post(f"/jobs/{job_id}/exports", json=body).status_code == 202
    [sent] = api.queue.calls
    run_export(job_id, api.db_url, model_cache, **sent.kwargs)  # what the worker's task runs

    listed = api.client.get(f"/jobs/{job_id}/artifacts").json()["formats"]
    assert set(listed) == {"lora", "gguf_q4_k_m"}
    assert all(entry["status"] == "ok" for entry in listed.values()), listed
    [gguf] = listed["gguf_q4_k_m"]["files"]
    got = api.client.get(f"/jobs/{job_id}/artifacts/gguf_q4_k_m/{gguf['file']}")
    assert got.status_code == 200 and len(got.content) == gguf["bytes"]
    assert got.headers["x-checksum-sha256"] == gguf["sha256"]
    notes = api.client.get(f"/jobs/{job_id}").json()["notes"]
    assert any(n.startswith("export gguf_q4_k_m: ok") for n in notes), notes


@pytest.mark.slow
def test_a_bad_adapter_folder_fails_each_format_with_a_code(
    api: Api, tmp_path: Path, model_dir: Path, model_cache: Path
) -> None:
    from core.export.run import run_export

    job_id = _succeeded(api, tmp_path)
    adapter = tmp_path / job_id / "adapter"
    _real_adapter(adapter, model_dir)
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    response = api.client.post(f"/jobs/{job_id}/exports", json={"formats": ["merged_16bit"]})
    assert response.status_code == 202
    run_export(job_id, api.db_url, model_cache, **api.queue.calls[0].kwargs)
    entry = api.client.get(f"/jobs/{job_id}/artifacts").json()["formats"]["merged_16bit"]
    assert entry["status"] == "failed"
    assert entry["error"]["code"] == "adapter_invalid", entry
