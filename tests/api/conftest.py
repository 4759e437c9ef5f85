"""Fixtures shared by the API tests: the in-process API, its seeded jobs and its home folder."""

from pathlib import Path

import pytest

from tests.api.in_process import Api, api, seeded  # noqa: F401  (fixtures)


@pytest.fixture
def home(api: Api, tmp_path: Path) -> Path:  # noqa: F811
    return tmp_path / "home"  # the `api` fixture's MEDTUNE_HOME
