"""Dockerfile.api and Dockerfile.gpu: hadolint, their layout, commands and what each installs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from core.queue import TRAIN_QUEUE
from tests.deploy.helpers import (
    ALLOWED_COPY_SOURCES,
    DOCKERFILE_API,
    DOCKERFILE_GPU,
    HEAVY,
    PYPROJECT,
    ROOT,
    SERVICE_UID,
    TRAINING_STACK,
    _api_requirements,
    _clean_env,
    _dockerfile,
    _final_user,
    _instructions,
    _json_array,
    _pip_installs,
    _requirements,
    _shell_commands,
    _tool,
)

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


def test_gpu_image_runs_the_training_worker() -> None:
    """The image's own command is the training worker; compose runs the inference one beside
    it with its own command (a worker on both queues would answer only between jobs)."""
    cmd = _json_array(_instructions(DOCKERFILE_GPU, "CMD")[-1])
    assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert cmd[cmd.index("-Q") + 1] == TRAIN_QUEUE
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
    assert lines == (
        PYPROJECT["dependencies"]
        + extras["gpu"]
        + extras["gguf"]
        + extras["export"]
        + extras["tracking"]
    )
    pinned = {Requirement(line).name: str(Requirement(line).specifier) for line in lines}
    assert pinned["unsloth"] == "==2026.10.9"
    assert pinned["unsloth-zoo"] == "==2026.10.9"
    assert pinned["torch"] == "==2.13.0"
    assert {"mlflow-skinny", "wandb"} <= set(pinned)  # the tracking extra: jobs' report_to
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
