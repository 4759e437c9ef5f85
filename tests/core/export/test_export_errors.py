"""Export failures with clear codes: other architectures, no 4-bit backend, no adapter, a deleted
artifact, and a Hub push without a token, a username or a network."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.errors import ConflictError, ExportError, JobNotReady
from core.export import formats as export
from core.export import gguf as gguf_export
from core.export import hub
from core.export.run import adapter_folder, push
from core.spec import JobSpec
from core.store.models import JobStatus


def test_gguf_of_another_architecture_names_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportError) as caught:
        gguf_export.write_f16(tmp_path, tmp_path / "x.gguf", name="x")
    assert caught.value.code == "gguf_unsupported_architecture"
    assert "GPT2LMHeadModel" in caught.value.detail
    assert not list(tmp_path.glob("x.gguf*"))


def test_merged_4bit_without_a_4bit_backend_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "bnb_4bit_supported", lambda: False)
    loaded = SimpleNamespace(engine="transformers+peft")
    with pytest.raises(ExportError) as caught:
        export._write_merged_4bit(loaded, tmp_path / "merged", tmp_path / "merged_4bit")
    assert caught.value.code == "export_requires_cuda"
    assert not (tmp_path / "merged_4bit").exists()


def _job(status: JobStatus, adapter_dir: Path | None) -> SimpleNamespace:
    return SimpleNamespace(
        id="job_x", status=status, adapter_dir=str(adapter_dir) if adapter_dir else None
    )


def test_exports_need_a_succeeded_job_with_its_adapter(tmp_path: Path) -> None:
    with pytest.raises(JobNotReady):
        adapter_folder(_job(JobStatus.running, tmp_path))  # type: ignore[arg-type]
    for missing in (None, tmp_path / "gone"):
        with pytest.raises(ConflictError) as caught:
            adapter_folder(_job(JobStatus.succeeded, missing))  # type: ignore[arg-type]
        assert caught.value.code == "adapter_missing"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert adapter_folder(_job(JobStatus.succeeded, tmp_path)) == tmp_path  # type: ignore[arg-type]


def _job_dir(tmp_path: Path) -> Path:
    """A job folder with an exported adapter and a failed merged_16bit in its manifest."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 10)
    export.update_manifest(
        tmp_path,
        {
            "lora": {
                "status": "ok",
                "folder": "adapter",
                "files": export.describe(tmp_path / "adapter"),
                "smoke_test": [],
            },
            "merged_16bit": {"status": "failed", "error": {"code": "x", "message": "y"}},
        },
    )
    return tmp_path


def test_only_ok_artifacts_are_pushed_and_a_deleted_one_is_named(tmp_path: Path) -> None:
    job_dir = _job_dir(tmp_path)
    manifest = export.read_manifest(job_dir)
    files = hub.pushable_files(job_dir, manifest, ["lora", "merged_16bit"])
    assert files == ["adapter/adapter_model.safetensors"]
    (job_dir / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ExportError) as caught:
        hub.pushable_files(job_dir, manifest, ["lora"])
    assert caught.value.code == "artifact_missing"
    assert "adapter/adapter_model.safetensors" in caught.value.detail


def _spec(username: str | None) -> JobSpec:
    return JobSpec.model_validate(
        {"model_config": {"finetuned_model": "smol-med"}, "hugging_face_username": username}
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("username", "env", "code"),
    [
        (None, {"HF_TOKEN": "hf_test"}, "hub_username_missing"),
        ("medtune", {}, "hub_token_missing"),
        ("medtune", {"HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "1"}, "hub_unreachable"),
        # Nothing listens on the port: the same as a machine with no network.
        (
            "medtune",
            {"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:{port}"},
            "hub_unreachable",
        ),
    ],
)
def test_a_failed_push_is_recorded_and_the_artifacts_stay(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    username: str | None,
    env: dict[str, str],
    code: str,
) -> None:
    for name in (*hub.TOKEN_VARIABLES, "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    port = _free_port()
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(port=port))
    job_dir = _job_dir(tmp_path)
    before = export.read_manifest(job_dir)
    manifest = push(job_dir, _spec(username), ["lora"])
    assert manifest["hub"]["status"] == "failed"
    assert manifest["hub"]["error"]["code"] == code, manifest["hub"]
    assert {k: v for k, v in manifest.items() if k != "hub"} == before
    assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_repository_is_named_from_the_spec() -> None:
    assert hub.repo_id("medtune", "smol-med") == "medtune/smol-med"


def test_a_later_export_frees_the_base_a_training_job_kept(
    tmp_path: Path, sqlite_url: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Later exports run on training workers: the kept base goes before the export loads its own.
    from core.export import run
    from core.store import jobs
    from core.store.db import session_scope
    from core.training import base_cache
    from tests.helpers import recipe_spec

    events: list[str] = []
    monkeypatch.setattr(base_cache, "release", lambda reason="": events.append("release"))

    def load(base_path: str, adapter_dir: Path) -> None:
        events.append("load")
        raise ExportError("unreadable", field="job_id", code="adapter_invalid")

    monkeypatch.setattr(run, "_load_finished", load)
    folder = tmp_path / "job"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    with session_scope(sqlite_url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(recipe_spec("sample:medical_qa"))).id
        assert jobs.claim(s, job_id, worker="w")
        jobs.finish(
            s,
            job_id,
            JobStatus.succeeded,
            artifacts_dir=str(folder),
            adapter_dir=str(folder / "adapter"),
        )
    manifest = run.run_export(
        job_id, sqlite_url, model_cache, formats=["merged_16bit"], gguf_quantizations=[]
    )
    assert manifest["merged_16bit"]["status"] == "failed"
    assert events == ["release", "load"]
