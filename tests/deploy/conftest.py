"""Fixtures of the deployment-file tests: the compose file resolved once per module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import COMPOSE_FILE, ENV_EXAMPLE, _run_compose_config


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
