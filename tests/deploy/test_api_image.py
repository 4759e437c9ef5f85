"""The API image installs no torch: the API imports none of the training stack, and what it
imports while serving comes from the dependency list in Dockerfile.api."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from tests.deploy.helpers import (
    FORBIDDEN_IN_API,
    LOCAL_PACKAGES,
    ROOT,
    _api_requirements,
    _clean_env,
    _env,
    _requirement_closure,
)

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
    from core.store.migrate import upgrade
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
