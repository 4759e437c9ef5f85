"""Hub failures each get their own code (gated, not found, revision, auth, offline), for base
models and datasets; revisions are passed through. No network: loaders raise the Hub's classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import httpx
import pytest
from huggingface_hub import errors as hub

from core.base_models import hub_call
from core.data.sources import load
from core.errors import HubUnavailable, MedtuneError
from core.pipeline import run_job
from core.settings import Settings
from core.spec import DatasetSection, JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.models import JobStatus
from tests.helpers import recipe_spec


def response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/x/y"))


def cases() -> list[Any]:
    return [
        pytest.param(
            hub.GatedRepoError("gated", response=response(403)),
            "hub_repo_gated",
            "name",
            id="gated",
        ),
        pytest.param(
            hub.RepositoryNotFoundError("404", response=response(404)),
            "hub_repo_not_found",
            "name",
            id="not-found",
        ),
        pytest.param(
            hub.RevisionNotFoundError("no rev", response=response(404)),
            "hub_revision_not_found",
            "revision",
            id="revision",
        ),
        pytest.param(
            hub.HfHubHTTPError("401 Unauthorized", response=response(401)),
            "hub_auth_failed",
            "name",
            id="no-auth",
        ),
        pytest.param(hub.LocalEntryNotFoundError("not cached"), "hub_offline", "name", id="cache"),
        pytest.param(hub.OfflineModeIsEnabled("offline"), "hub_offline", "name", id="offline"),
        pytest.param(ConnectionError("reset by peer"), "hub_unreachable", "name", id="network"),
    ]


def raising(error: BaseException, *, wrap: bool, seen: dict[str, Any] | None = None) -> Any:
    def loader(*args: Any, **kwargs: Any) -> Any:
        if seen is not None:
            seen.update(kwargs)
        if not wrap:
            raise error
        # What transformers does: its own OSError, the Hub's error as the cause.
        try:
            raise error
        except Exception as cause:
            raise OSError(
                "x/y is not a local folder and is not a valid model identifier"
            ) from cause

    return loader


@pytest.mark.parametrize("wrap", [False, True], ids=["raw", "wrapped"])
@pytest.mark.parametrize(("error", "code", "field"), cases())
def test_model_loads_name_the_cause(
    error: BaseException, code: str, field: str, wrap: bool
) -> None:
    with pytest.raises(HubUnavailable) as info:
        hub_call("x/y", raising(error, wrap=wrap), "x/y", revision="v2")
    assert info.value.code == code
    assert info.value.field == f"model_config.{'base_model' if field == 'name' else field}"
    assert "x/y" in info.value.detail
    if code == "hub_revision_not_found":
        assert "'v2'" in info.value.detail


@pytest.mark.parametrize(("error", "code", "field"), cases())
def test_dataset_loads_name_the_cause_and_pass_the_revision(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, code: str, field: str
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(datasets, "load_dataset", raising(error, wrap=False, seen=seen))
    with pytest.raises(MedtuneError) as info:
        load(DatasetSection(name="owner/medical", split="test", revision="refs/pr/3"))
    assert info.value.code == code
    assert info.value.field == f"training_dataset.{field}"
    assert seen == {"split": "test", "revision": "refs/pr/3"}


def test_datasets_own_not_found_error_is_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets.exceptions import DatasetNotFoundError

    error = DatasetNotFoundError("Dataset 'owner/medical' doesn't exist on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", raising(error, wrap=False))
    with pytest.raises(MedtuneError) as info:
        load(DatasetSection(name="owner/medical"))
    assert info.value.code == "hub_repo_not_found"


def test_a_mix_source_names_its_own_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    error = hub.RevisionNotFoundError("no rev", response=response(404))
    monkeypatch.setattr(datasets, "load_dataset", raising(error, wrap=False))
    section = DatasetSection.model_validate(
        {"sources": [{"name": "sample:medical_qa"}, {"name": "owner/b", "revision": "v9"}]}
    )
    from core.data.mix import collect

    with pytest.raises(MedtuneError) as info:
        collect(section)
    assert info.value.code == "hub_revision_not_found"
    assert info.value.field == "training_dataset.sources[1].revision"


@pytest.mark.parametrize("revision", ["../main", "a..b", "-x", ""])
def test_revisions_are_plain_references(revision: str) -> None:
    with pytest.raises(ValueError):
        JobSpec.model_validate({"model_config": {"revision": revision}})
    with pytest.raises(ValueError):
        JobSpec.model_validate({"training_dataset": {"revision": revision}})


def test_a_job_on_a_gated_base_model_fails_with_its_code(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    seen: dict[str, Any] = {}
    gated = hub.GatedRepoError("gated", response=response(403))
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", raising(gated, wrap=True, seen=seen)
    )
    spec = recipe_spec("sample:medical_qa", max_steps=1)
    spec["model_config"] = {**spec["model_config"], "base_model": "meta-llama/Llama-3.2-1B"}
    spec["model_config"]["revision"] = "main"
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path, database_url=sqlite_url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.failed
    with session_scope(sqlite_url) as s:
        job = jobs.get_job(s, job_id)
    assert job.error_code == "hub_repo_gated", job.error_message
    assert "meta-llama/Llama-3.2-1B" in (job.error_message or "")
    assert seen["revision"] == "main"
