"""Local base models are confined to the model roots; names that become paths are sanitised."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.base_models import (
    ModelPathNotAllowed,
    allowed_model_roots,
    check_base_model,
    confined_model_dir,
    resolve,
)
from core.errors import ModelNotAvailable
from core.settings import Settings, get_settings
from core.spec import JobSpec, ModelSection, TrainingSection
from core.store import jobs
from core.store.db import session_scope
from tests.api.in_process import FakeQueue, assert_problem
from tests.api.test_auth import build
from tests.helpers import recipe_spec

FIELD = "model_config.base_model"


def fake_model(folder: Path) -> Path:
    """A folder that looks like a model to the submit-time checks (config.json only)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@dataclass
class Dirs:
    cache: Path  # MEDTUNE_MODEL_CACHE
    extra: Path  # a folder in MEDTUNE_MODEL_ROOTS
    outside: Path

    @property
    def roots(self) -> list[Path]:
        return [self.cache.resolve(), self.extra.resolve()]


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    d = Dirs(cache=tmp_path / "cache", extra=tmp_path / "extra", outside=tmp_path / "outside")
    for folder in (d.cache, d.extra, d.outside):
        folder.mkdir()
    return d


def escape(dirs: Dirs, kind: str) -> str:
    """A base_model that leads outside the roots, made the way ``kind`` says."""
    secret = fake_model(dirs.outside / "secret-model")
    if kind == "absolute":
        return str(secret)
    if kind == "dotdot":
        return f"{dirs.cache}/../outside/secret-model"
    if kind == "symlinked-folder":
        (dirs.cache / "innocent").symlink_to(secret, target_is_directory=True)
        return str(dirs.cache / "innocent")
    if kind == "link-in-folder":
        model = fake_model(dirs.cache / "tuned")
        (model / "model.safetensors").symlink_to(secret / "config.json")
        return str(model)
    if kind == "linked-subfolder":
        model = fake_model(dirs.extra / "tuned")
        (model / "weights").symlink_to(secret, target_is_directory=True)
        return str(model)
    if kind == "missing-outside":
        return str(dirs.outside / "nothing-here")
    if kind == "home":
        return "~/../../etc"
    assert kind == "etc", kind
    return "/etc"


ESCAPES = [
    "absolute",
    "dotdot",
    "symlinked-folder",
    "link-in-folder",
    "linked-subfolder",
    "missing-outside",
    "home",
    "etc",
]


# --- the core check ----------------------------------------------------------------------------


def test_folders_inside_the_roots_resolve_to_their_real_path(dirs: Dirs) -> None:
    cached = fake_model(dirs.cache / "llama")
    extra = fake_model(dirs.extra / "org" / "mistral")
    # A link that stays inside the roots is fine, and so is a '..' that comes back in.
    (dirs.extra / "alias").symlink_to(cached, target_is_directory=True)
    (extra / "shared-config.json").symlink_to(cached / "config.json")
    assert confined_model_dir(str(cached), roots=dirs.roots) == cached.resolve()
    assert (
        confined_model_dir(f"{dirs.extra}/org/../org/mistral", roots=dirs.roots) == extra.resolve()
    )
    assert confined_model_dir(str(dirs.extra / "alias"), roots=dirs.roots) == cached.resolve()
    assert resolve(str(dirs.extra / "alias"), models_dir=dirs.cache, roots=dirs.roots) == str(
        cached.resolve()
    )


def test_the_embedded_model_and_hub_ids_are_not_local(dirs: Dirs) -> None:
    for name in ("smollm2-135m-instruct", "unsloth/llama-3-8b-Instruct-bnb-4bit", "gpt2"):
        assert confined_model_dir(name, roots=dirs.roots) is None
    assert resolve("someone/model", models_dir=dirs.cache, roots=dirs.roots) == "someone/model"


@pytest.mark.parametrize("kind", ESCAPES)
def test_paths_leading_outside_the_roots_are_refused(dirs: Dirs, kind: str) -> None:
    name = escape(dirs, kind)
    with pytest.raises(ModelPathNotAllowed) as caught:
        check_base_model(name, roots=dirs.roots)
    assert caught.value.field == FIELD
    assert caught.value.status == 422
    # The message names what the client sent and no other server path.
    detail = caught.value.detail.replace(name, "<name>")
    assert str(dirs.cache.parent) not in detail and "/etc" not in detail, detail
    # The worker's loader refuses it too: resolve() checks again before from_pretrained.
    with pytest.raises(ModelPathNotAllowed):
        resolve(name, models_dir=dirs.cache, roots=dirs.roots)


def test_a_missing_folder_inside_the_roots_is_not_available(dirs: Dirs) -> None:
    with pytest.raises(ModelNotAvailable) as caught:
        check_base_model(str(dirs.cache / "not-converted-yet"), roots=dirs.roots)
    assert caught.value.code == "model_not_available"
    assert not isinstance(caught.value, ModelPathNotAllowed)
    # A file is not a model folder either.
    (dirs.cache / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelNotAvailable):
        check_base_model(str(dirs.cache / "weights.bin"), roots=dirs.roots)


def test_a_link_loop_is_refused_without_a_crash(dirs: Dirs) -> None:
    (dirs.cache / "loop").symlink_to(dirs.cache / "loop")
    with pytest.raises(ModelNotAvailable):
        check_base_model(str(dirs.cache / "loop"), roots=dirs.roots)
    model = fake_model(dirs.cache / "looped-inside")
    (model / "self").symlink_to(model / "self")
    with pytest.raises(ModelPathNotAllowed):
        check_base_model(str(model), roots=dirs.roots)


def test_a_hub_shaped_name_that_exists_on_disk_is_confined(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """from_pretrained('org/model') reads ./org/model when it exists: that is a local path."""
    fake_model(dirs.outside / "org" / "model")
    monkeypatch.chdir(dirs.outside)
    with pytest.raises(ModelPathNotAllowed):
        check_base_model("org/model", roots=dirs.roots)
    monkeypatch.chdir(dirs.cache)
    fake_model(dirs.cache / "org" / "model")
    assert confined_model_dir("org/model", roots=dirs.roots) == (dirs.cache / "org/model").resolve()


def test_the_roots_come_from_the_settings(dirs: Dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDTUNE_MODEL_CACHE", str(dirs.cache))
    monkeypatch.setenv("MEDTUNE_MODEL_ROOTS", json.dumps([str(dirs.extra)]))
    get_settings.cache_clear()
    try:
        assert allowed_model_roots() == dirs.roots
        model = fake_model(dirs.extra / "m")
        # Without explicit roots (the worker's resolve), the worker's own settings decide.
        assert resolve(str(model), models_dir=dirs.cache) == str(model.resolve())
        with pytest.raises(ModelPathNotAllowed):
            resolve(str(fake_model(dirs.outside / "m")), models_dir=dirs.cache)
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv("MEDTUNE_MODEL_ROOTS", "/srv/a:/srv/b")
    assert Settings(_env_file=None).model_roots == [Path("/srv/a"), Path("/srv/b")]  # type: ignore[call-arg]
    monkeypatch.delenv("MEDTUNE_MODEL_ROOTS")
    monkeypatch.delenv("MEDTUNE_MODEL_CACHE")
    home = Settings(_env_file=None, home=dirs.outside)  # type: ignore[call-arg]
    assert allowed_model_roots(home) == [(dirs.outside / "models").resolve()]


# --- names in specs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "models/../../etc",  # relative, not path-shaped: from_pretrained would read it from disk
        "a/b/c",
        "org/..",
        "..",
        "owner/name\x00.json",
        "name\nwith-newline",
        "",
        "x" * 301,
    ],
)
def test_base_model_names_that_are_neither_hub_ids_nor_paths_are_refused(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ModelSection(base_model=name)
    assert caught.value.errors()[0]["loc"] == ("base_model",)


@pytest.mark.parametrize(
    "name",
    ["smollm2-135m-instruct", "gpt2", "meta-llama/Llama-3.1-8B", "/models/x", "./m", "~/m", "../m"],
)
def test_hub_ids_and_path_shaped_names_are_well_formed(name: str) -> None:
    assert ModelSection(base_model=name).base_model == name


BAD_PATH_NAMES = ["../x", "..", "/abs", "a/b", ".hidden", "a\x00b", "a b", "x" * 97, ""]


@pytest.mark.parametrize("name", BAD_PATH_NAMES)
def test_names_used_in_paths_are_plain_names(name: str) -> None:
    """finetuned_model and output_dir become folder names: one plain path component only."""
    with pytest.raises(ValidationError):
        ModelSection(finetuned_model=name)
    with pytest.raises(ValidationError):
        TrainingSection(output_dir=name)
    with pytest.raises(ValidationError):
        JobSpec.model_validate({"hugging_face_username": name})


# --- the API -----------------------------------------------------------------------------------


@dataclass
class Env:
    client: TestClient
    queue: FakeQueue
    db_url: str
    dirs: Dirs

    def post(self, base_model: str) -> Any:
        spec = recipe_spec("sample:medical_qa")
        spec["model_config"]["base_model"] = base_model
        return self.client.post("/jobs", json=spec)

    def job_count(self) -> int:
        with session_scope(self.db_url) as s:
            return len(jobs.list_jobs(s, limit=100)[0])


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path, dirs: Dirs) -> Iterator[Env]:
    queue = FakeQueue()
    app = build(
        sqlite_url,
        tmp_path / "home",
        queue,
        auth="disabled",
        model_cache=dirs.cache,
        model_roots=[dirs.extra],
    )
    with TestClient(app) as client:
        yield Env(client, queue, sqlite_url, dirs)


def test_the_api_accepts_models_inside_the_roots(env: Env) -> None:
    for model in (fake_model(env.dirs.cache / "a"), fake_model(env.dirs.extra / "b")):
        response = env.post(str(model))
        assert response.status_code == 201, response.text
        assert response.json()["base_model"] == str(model)
    assert env.post("someone/hub-model").status_code == 201
    assert len(env.queue.calls) == 3


@pytest.mark.parametrize("kind", ESCAPES)
def test_the_api_refuses_models_outside_the_roots(env: Env, kind: str) -> None:
    name = escape(env.dirs, kind)
    problem = assert_problem(env.post(name), 422, "model_path_not_allowed", FIELD)
    detail = problem["detail"].replace(name, "<name>")
    assert str(env.dirs.cache.parent) not in detail, detail
    assert env.queue.calls == []
    assert env.job_count() == 0


def test_the_api_refuses_relative_escapes_by_shape(env: Env) -> None:
    problem = assert_problem(env.post("models/../../etc"), 422, "invalid_value", FIELD)
    assert "Hub model id" in problem["detail"]
    assert env.queue.calls == []


def test_the_preview_is_confined_too(env: Env) -> None:
    body = {"base_model": escape(env.dirs, "absolute")}
    response = env.client.post("/datasets/preview", json=body)
    assert_problem(response, 422, "model_path_not_allowed", "base_model")
    assert_problem(
        env.client.post("/datasets/preview", json={"base_model": "a/../../b"}),
        422,
        "invalid_value",
        "base_model",
    )
    assert env.queue.calls == []


def test_the_openai_route_is_confined_too(env: Env) -> None:
    body = {"model": escape(env.dirs, "dotdot"), "training_file": "sample:medical_qa"}
    response = env.client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "model_path_not_allowed"
    assert env.queue.calls == []
