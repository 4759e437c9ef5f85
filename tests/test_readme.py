"""README.md's examples run, so they cannot drift from the code again.

- Every route its tables list exists; every `MEDTUNE_*` variable it names is read somewhere.
- Every backticked snake_case name (field, error code, metric) is in the source.
- Every "STATUS `code`" pair it states is asserted as such by a test (`assert_problem` style).
- Its JSON examples are accepted by the in-process API (the error example comes back as shown).
- Its CLI block runs, line by line, against a live API (uvicorn in a thread, a fake queue), and
  its upload example runs in bash as written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from api.main import create_app
from cli.main import build_parser, main
from core.settings import Settings
from core.spec import JobSpec
from tests.api.in_process import Api
from tests.api.in_process import api as api  # the in-process API fixture
from tests.helpers import ROOT, tiny_dataset
from tests.job_files import finish_job
from tests.live_api import serve

README = (ROOT / "README.md").read_text()
SOURCE = "".join(
    p.read_text() for d in ("core", "api", "cli", "worker") for p in (ROOT / d).rglob("*.py")
)
TESTS = {
    p: p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_readme.py"
}
# Names the README spells that the source builds from parts.
BUILT_NAMES = {
    "medquad_file_format": "core/data/medquad.py: 'medquad_file_' + reason",
    "medtune_http_requests_total": "prometheus_client adds _total to the counter",
}


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def spec_example() -> dict[str, Any]:
    found = [b for b in code_blocks("json") if b.lstrip().startswith('{\n  "model_config"')]
    assert len(found) == 1, "the job spec example"
    spec: dict[str, Any] = json.loads(found[0])
    return spec


# --- names ----------------------------------------------------------------------------------


def test_every_listed_route_exists() -> None:
    listed = re.findall(r"`(GET|POST|DELETE|PUT|PATCH) (/[^`?\s]*)", README)
    assert len(listed) > 30
    app = create_app()
    app_routes = {
        (method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    } | {("GET", r.path) for r in app.routes if isinstance(r, Route) and r.methods}
    missing = [
        f"{m} {p}" for m, p in listed if (m, re.sub(r"\{[^}]+\}", "{}", p)) not in app_routes
    ]
    assert not missing, f"README routes the app does not have: {missing}"
    assert ("GET", "/redoc") in app_routes and "`GET /redoc`" in README


def test_every_environment_variable_is_read() -> None:
    fields = set(Settings.model_fields)
    named = set(re.findall(r"\bMEDTUNE_[A-Z0-9_]+\b", README))
    # Test and benchmark switches count too (MEDTUNE_GPU_TOKENIZERS, MEDTUNE_FAULT_*).
    scripts = "".join(
        p.read_text()
        for d in ("tests", "bench", "scripts")
        for p in (ROOT / d).rglob("*.*")
        if p.suffix in (".py", ".sh")
    )
    unread = sorted(v for v in named if v not in SOURCE + scripts and v[8:].lower() not in fields)
    assert not unread, f"README names variables nothing reads: {unread}"
    assert "MEDTUNE_API_KEY" in named


def test_every_backticked_name_is_in_the_source() -> None:
    names = set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", README))
    assert len(names) > 100
    absent = sorted(n for n in names - BUILT_NAMES.keys() if n not in SOURCE)
    assert not absent, f"README names that no module spells: {absent}"
    for name in BUILT_NAMES:
        assert name in README, f"{name} left the README: drop it from BUILT_NAMES"


def test_every_status_and_code_pair_is_asserted_by_a_test() -> None:
    # "a 422 `invalid_json`", "404 `file_not_found`": the status must be the one a test asserts.
    pairs = set(re.findall(r"\b([1-5]\d\d)\s+`([a-z][a-z0-9_]+)`", README))
    assert ("422", "invalid_json") in pairs and ("400", "invalid_body") in pairs
    unchecked = sorted(
        f"{status} {code}"
        for status, code in pairs
        # assert_problem(r, 404, "file_not_found"), or `status_code == 504 and ... == "code"`
        if not any(re.search(rf'\b{status}\b[^;]{{0,80}}"{code}"', text) for text in TESTS.values())
    )
    assert not unchecked, f"README status/code pairs no test asserts: {unchecked}"


# --- JSON examples --------------------------------------------------------------------------


def test_the_job_spec_example_is_accepted(api: Api) -> None:
    response = api.client.post("/jobs", json=spec_example())
    assert response.status_code == 201, response.text
    assert response.json()["finetuned_model"] == "smollm2-medical"


def test_the_error_example_is_what_the_api_answers(api: Api) -> None:
    problem = next(json.loads(b) for b in code_blocks("json") if '"type": "https://' in b)
    spec = spec_example()
    spec["training_config"]["learning_rate"] = 0
    response = api.client.post("/jobs", json=spec)
    assert response.status_code == problem["status"]
    body = response.json()
    assert {k: body[k] for k in problem} == problem


def test_json_fragments_are_valid_spec_sections(api: Api) -> None:
    fragments = [b for b in code_blocks("json") if b.lstrip().startswith('"')]
    assert len(fragments) >= 3
    for fragment in fragments:
        spec = {**spec_example(), **json.loads("{" + fragment + "}")}
        JobSpec.model_validate(spec)  # file ids and server paths are checked at submit
        if '"file-' not in fragment and '"/srv' not in fragment:
            response = api.client.post("/jobs", json=spec)
            assert response.status_code == 201, (fragment, response.text)


def test_the_openai_curl_example_is_accepted(api: Api) -> None:
    curl = next(b for b in code_blocks("bash") if "/v1/fine_tuning/jobs" in b)
    body = json.loads(shlex.split(curl.replace("\\\n", " "))[-1])
    response = api.client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["hyperparameters"]["batch_size"] == 8


def test_malformed_json_and_undecodable_bodies(api: Api) -> None:
    headers = {"content-type": "application/json"}
    broken = api.client.post("/jobs", content=b'{"model_config": ', headers=headers)
    assert broken.status_code == 422 and broken.json()["code"] == "invalid_json"
    assert broken.json()["field"] == "body"
    binary = api.client.post("/jobs", content=b"\xff\xfe{", headers=headers)
    assert binary.status_code == 400 and binary.json()["code"] == "invalid_body"


# --- the CLI --------------------------------------------------------------------------------


def test_help_says_how_keys_are_sent(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["jobs", "list", "--help"])
    assert "MEDTUNE_API_KEY" in capsys.readouterr().out
    assert "MEDTUNE_API_KEY" in build_parser().format_help()


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with serve(sqlite_url, tmp_path / "home") as url:
        yield url, tmp_path / "home"


PLACEHOLDERS = {"JOB_ID": "job_x", "FILE_ID": "file-x", "ID": "file-x", "N": "3", "K": "key-1"}


def cli_lines() -> list[str]:
    block = next(b for b in code_blocks("bash") if "medtune jobs create -f spec.json" in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_every_cli_line_parses_with_its_options() -> None:
    parser = build_parser()
    for line in cli_lines():
        argv = shlex.split(line.replace("[", "").replace("]", ""))[1:]
        argv = [PLACEHOLDERS.get(a, a) for a in argv]
        parser.parse_args(argv)  # SystemExit(2) on an option or command that is gone


def test_the_cli_block_runs_against_a_server(
    server: tuple[str, Path],
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, home = server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDTUNE_URL", url)
    (tmp_path / "spec.json").write_text(json.dumps(spec_example()))
    tiny_dataset(tmp_path / "data.jsonl")
    job_id = httpx.post(f"{url}/jobs", json=spec_example()).json()["id"]
    queued = httpx.post(f"{url}/jobs", json=spec_example()).json()["id"]
    finish_job(sqlite_url, home, job_id)
    names = {**PLACEHOLDERS, "JOB_ID": job_id, "FILE": "out.bin"}
    for line in cli_lines():
        required = re.sub(r"\s*\[[^\]]*\]", "", line)  # optional parts, e.g. --wait, left out
        if "jobs cancel" in required:
            required = required.replace("JOB_ID", queued)
        if "FILE_ID" in required or " ID" in required:
            uploaded = httpx.post(f"{url}/files", files={"file": ("d.jsonl", b'{"a": 1}\n')})
            names["FILE_ID"] = names["ID"] = uploaded.json()["id"]
        argv = [names.get(a, a) for a in shlex.split(required)[1:]]
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, (line, out.out, out.err)
    assert (tmp_path / "model-q4_k_m.gguf").read_bytes().startswith(b"GGUF")
    pngs = sorted(p.name for p in (tmp_path / f"{job_id}-plots").iterdir())
    assert pngs == ["throughput.png", "training.png"]


def test_the_upload_example_runs_in_bash(server: tuple[str, Path], tmp_path: Path) -> None:
    block = section("Uploading data").split("```bash\n")[1].split("```")[0]
    tiny_dataset(tmp_path / "train.jsonl", rows=20)
    env = {**os.environ, "MEDTUNE_URL": server[0], "PATH": f"{ROOT / '.venv/bin'}:/usr/bin:/bin"}
    env.pop("MEDTUNE_API_KEY", None)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("job job_")
