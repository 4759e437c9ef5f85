"""The dashboard: served next to the API (in-process), and driven in headless Chromium against the
live stack (real Postgres, Redis, Celery worker and SmolLM2)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.main import STATIC_DIR
from core.store import jobs
from core.store.db import session_scope
from tests.api.in_process import Api, assert_problem
from tests.api.in_process import api as api  # the in-process API fixture
from tests.conftest import Stack
from tests.helpers import recipe_spec, tiny_dataset, wait_status
from tests.job_files import finish_job
from tests.live_api import serve
from tests.test_readme import spec_example

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/medtune-dashboard-job.png")
STEPS = 12


# --- in-process ---------------------------------------------------------------------------------


def test_dashboard_is_served_without_shadowing_the_api(api: Api) -> None:
    page = api.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js"' in page.text
    for asset in STATIC_DIR.iterdir():
        got = api.client.get(f"/static/{asset.name}")
        assert got.status_code == 200, asset.name
        if asset.suffix == ".js":  # browsers run a module only with a JavaScript type
            assert got.headers["content-type"].startswith("text/javascript")
    assert api.client.get("/docs").status_code == 200
    paths = api.client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/jobs" in paths and "/v1/fine_tuning/jobs" in paths
    assert api.client.get("/jobs").json()["object"] == "list"
    # Unknown paths, and other methods, are still API problems, not the dashboard.
    assert_problem(api.client.get("/nowhere"), 404, "not_found", None)
    assert_problem(api.client.post("/nowhere"), 404, "not_found", None)
    assert_problem(api.client.get("/static/missing.js"), 404, "not_found", None)


def test_dashboard_loads_nothing_from_elsewhere() -> None:
    files = sorted(STATIC_DIR.iterdir())
    scripts = {f.name for f in files if f.suffix == ".js"}
    assert {"index.html", "app.js", "app.css"} <= {f.name for f in files}
    for path in files:
        text = path.read_text(encoding="utf-8")
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        assert "@import" not in text and "import(" not in text
        # Modules import one another by relative path, and nothing else.
        imported = set(re.findall(r'^import .* from "([^"]+)";$', text, flags=re.M))
        assert {name.removeprefix("./") for name in imported} <= scripts, (path.name, imported)
        assert all(name.startswith("./") for name in imported)
        assert len(text.splitlines()) < 600, f"{path.name}: split it into modules"


# --- headless Chromium on the live stack --------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, pg_redis_stack: Stack) -> Iterator[Any]:
    """A page that may talk to the stack only; any other request fails the test."""
    context = browser.new_context(
        base_url=pg_redis_stack.url, viewport={"width": 1280, "height": 1100}
    )
    outside: list[str] = []
    errors: list[str] = []

    def only_the_stack(route: Any) -> None:
        if route.request.url.startswith(pg_redis_stack.url) or route.request.url.startswith(
            "data:"
        ):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_stack)
    tab = context.new_page()
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert outside == [], f"the dashboard reached outside the server: {outside}"
    assert errors == [], f"JavaScript errors: {errors}"


def points(tab: Any, chart: str) -> int:
    return int(tab.get_attribute(f"#{chart}", "data-points"))


@pytest.mark.slow
def test_dashboard_follows_a_job_live_and_asks_the_tuned_model(
    page: Any, pg_redis_stack: Stack, tmp_path: Path
) -> None:
    data = tiny_dataset(tmp_path / "tiny.jsonl")
    with pg_redis_stack.client() as client:
        created = client.post("/jobs", json=recipe_spec(data, max_steps=STEPS, save_steps=4))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        # The jobs list shows it.
        page.goto("/")
        row = page.locator(f'tr[data-job-id="{job_id}"]')
        row.wait_for(timeout=15_000)
        assert row.locator(".badge").inner_text() in {"queued", "running"}

        # Its page: the loss chart gains points while the job trains.
        row.locator("a").click()
        page.wait_for_url(f"**/#/jobs/{job_id}")
        page.wait_for_function(
            "() => +document.querySelector('#loss-chart').dataset.points >= 1", timeout=240_000
        )
        first = points(page, "loss-chart")
        assert first < STEPS, "the job had finished before the page saw a step"
        page.wait_for_function(
            f"() => +document.querySelector('#loss-chart').dataset.points > {first}",
            timeout=240_000,
        )
        assert points(page, "loss-chart") > first

        # A second job waits behind the first on the one worker; cancelled, it has no dataset.
        queued = client.post("/jobs", json=recipe_spec(data)).json()["id"]
        assert client.post(f"/jobs/{queued}/cancel").json()["status"] == "cancelled"

        final = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, timeout_s=600)
        assert final["status"] == "succeeded", pg_redis_stack.tail_logs() + str(final)

    page.locator('#job-status .badge[data-status="succeeded"]').wait_for(timeout=30_000)
    page.wait_for_function(
        f"() => +document.querySelector('#loss-chart').dataset.points === {STEPS}"
    )
    assert points(page, "lr-chart") == STEPS
    assert page.locator("#loss-chart polyline").count() == 1
    page.locator('#artifacts .artifact[data-entry="lora"]').wait_for()
    page.locator("#dataset-stats").wait_for()
    examples = page.inner_text('#dataset-stats > table.kv tr[data-key="examples"] td')
    assert examples == str(final["dataset_stats"]["examples"]) == "8"
    with pg_redis_stack.client() as client:
        saved = [c["step"] for c in client.get(f"/jobs/{job_id}/checkpoints").json()["data"]]
    assert saved and saved[-1] == STEPS
    cells = page.locator("#checkpoints tbody tr td:first-child")
    cells.nth(len(saved) - 1).wait_for()
    assert [int(c) for c in cells.all_inner_texts()] == saved

    # The chat box: the tuned model and the base model answer side by side.
    page.fill("#chat-question", "What causes iron deficiency anemia?")
    page.fill("#max-tokens", "24")
    page.check("#ask-base")
    page.click("#chat-ask")
    tuned = page.locator('.answer[data-adapter="true"][data-state="answered"]')
    base = page.locator('.answer[data-adapter="false"][data-state="answered"]')
    tuned.wait_for(timeout=120_000)
    base.wait_for(timeout=120_000)
    assert tuned.locator(".text").inner_text().strip()
    assert base.locator(".text").inner_text().strip()
    assert "smollm2-medical-test" in tuned.inner_text()
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # With an API key set (auth on), the stream is read over fetch, carrying the key.
    with page.expect_request(lambda r: r.url.endswith(f"/jobs/{job_id}/events")) as stream:
        page.fill("#api-key", "mt_test_key")
        page.dispatch_event("#api-key", "change")
    assert stream.value.headers["authorization"] == "Bearer mt_test_key"
    assert page.get_attribute("#stream-state", "data-transport") == "fetch"
    page.wait_for_function(
        f"() => +document.querySelector('#loss-chart').dataset.points === {STEPS}"
    )
    page.locator("#stream-state", has_text="job finished").wait_for()

    # The cancelled job: dataset "not ready", and the tuned model's refusal shown readably.
    page.goto(f"/#/jobs/{queued}")
    page.locator('#dataset [data-state="not-ready"]').wait_for()
    page.fill("#chat-question", "Hello?")
    page.click("#chat-ask")
    refused = page.locator('.answer[data-adapter="true"][data-state="error"]')
    refused.wait_for()
    assert "409 job_not_ready (job_id)" in refused.inner_text()

    # Back on the list, both jobs with their final statuses.
    page.goto("/#/")
    page.locator(f'tr[data-job-id="{job_id}"] .badge[data-status="succeeded"]').wait_for()
    page.locator(f'tr[data-job-id="{queued}"] .badge[data-status="cancelled"]').wait_for()


# --- headless Chromium on the API alone (a finished job's files written as a worker would) ------

# The statistics of a weighted two-source mix with a held-out share, as core.data.prepare
# stores them (a gate that failed is below).
MIX_STATS: dict[str, Any] = {
    "source": "mix", "format": "records", "layout": "alpaca", "chat_template": "tokenizer",
    "system_prompt": {"source": "row", "row": 0, "job": 83, "none": 0}, "max_seq_length": 256,
    "rows": 84, "examples": 59, "validation_examples": 7,
    "by_source": {"/data/a.jsonl": 46, "/data/b.jsonl": 13},
    "dropped": {"duplicate_exact": 3, "bad_row_invalid_json": 1}, "dropped_total": 4,
    "tokens": 5152, "trained_tokens": 3146, "trained_token_share": 0.6106, "truncated": 0,
    "truncation_rate": 0.0, "length_p50": 86, "length_p90": 94, "length_p99": 99,
    "length_max": 99,
    "sources": [
        {"index": 0, "name": "/data/a.jsonl", "weight": 3.0, "share": 0.75, "format": "records",
         "layout": "alpaca", "rows": 50, "dropped": {}, "cleaned": 50, "taken": 50,
         "repeated": 0, "examples": 46, "validation_examples": 4},
        {"index": 1, "name": "/data/b.jsonl", "weight": 1.0, "share": 0.25, "format": "records",
         "layout": "alpaca", "rows": 34, "dropped": {"duplicate_exact": 3,
         "bad_row_invalid_json": 1}, "cleaned": 30, "taken": 16, "repeated": 0, "examples": 13,
         "validation_examples": 3},
    ],
    "gate": {"passed": True, "problem_count": 0, "problems": []},
    "validation": {"kind": "validation_share", "source": "mix", "share": 0.1, "seed": 42,
                   "examples": 7},
}  # fmt: skip
FAILED_GATE = {
    "passed": False,
    "problem_count": 2,
    "problems": [
        {"code": "no_end_of_turn", "detail": "the answer is not closed", "example_index": 3,
         "field": "training_dataset"},
        {"code": "truncated_share", "detail": "41% of examples truncated", "example_index": None,
         "field": "training_dataset.max_truncated_share"},
    ],
}  # fmt: skip


@dataclass
class Local:
    url: str
    db_url: str
    home: Path


@pytest.fixture
def local(sqlite_url: str, tmp_path: Path) -> Iterator[Local]:
    with serve(sqlite_url, tmp_path / "home") as url:
        yield Local(url, sqlite_url, tmp_path / "home")


@pytest.fixture
def tab(browser: Any, local: Local) -> Iterator[Any]:
    context = browser.new_context(base_url=local.url, viewport={"width": 1280, "height": 1400})
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors: {errors}"


def finished_job(local: Local, stats: dict[str, Any], spec: dict[str, Any] | None = None) -> str:
    job_id = str(httpx.post(f"{local.url}/jobs", json=spec or spec_example()).json()["id"])
    job_dir = finish_job(local.db_url, local.home, job_id)
    with session_scope(local.db_url) as s:
        jobs.set_fields(s, job_id, dataset_stats=stats, artifacts_dir=str(job_dir))
        for note in ("export lora: ok", "export lora: ok", "evaluation: 12 questions"):
            jobs.add_note(s, job_id, note)
    return job_id


def test_a_finished_job_shows_every_card_readably(tab: Any, local: Local) -> None:
    job_id = finished_job(local, MIX_STATS)
    with session_scope(local.db_url) as s:  # set_fields only touches a running job
        job = jobs.get_job(s, job_id)
        job.dataset_stats = MIX_STATS
        job.stop_reason, job.kept_step = "early_stopping", 12
        job.tracking = {
            "mlflow": {"tracking_uri": f"sqlite:///{local.home}/mlflow/mlflow.db", "run_id": "r1"},
            "wandb": {"run_id": job_id, "mode": "offline", "url": None, "dir": str(local.home)},
        }
        s.add(job)
        s.commit()
    tab.goto(f"/#/jobs/{job_id}")
    tab.locator("#eval-scores").wait_for()
    tab.locator('#artifacts .artifact[data-entry="lora"]').wait_for()
    tab.locator("#dataset-stats").wait_for()
    text = tab.inner_text("main")
    assert "[object " not in text and "undefined" not in text and "NaN" not in text
    terms, values = (tab.locator(f"#job-details {t}").all_inner_texts() for t in ("dt", "dd"))
    details = dict(zip(terms, values, strict=True))
    assert details["Stopped"] == "early_stopping; adapter from step 12"
    assert details["Tracking"] == f"MLflow run r1 (server's store); W&B run {job_id} (offline)"
    assert str(local.home) not in details["Tracking"]  # no server paths

    # Dataset: a table per source, the gate as passed, the held-out share in words.
    assert tab.locator("#dataset-stats table.source").count() == 2, tab.inner_text("#dataset")
    second = tab.inner_text('#dataset-stats table.source[data-source="1"]')
    assert "/data/b.jsonl" in second and "25% of the mix" in second
    assert "bad_row_invalid_json: 1" in second and "Taken\t16" in second
    summary = tab.locator("#dataset-stats > table.kv")
    assert summary.locator('tr[data-key="examples"] td').inner_text() == "59"
    assert "trained 3146 (61.1%)" in summary.locator('tr[data-key="tokens"] td').inner_text()
    assert tab.get_attribute("#gate", "data-passed") == "true"
    assert "10% of the training data held out (seed 42): 7 examples" in tab.inner_text(
        "#validation"
    )

    # Evaluation: base and tuned side by side, each score with its interval and verdict.
    rouge = tab.locator('#eval-scores tr[data-metric="rougeL"] td').all_inner_texts()
    assert rouge == ["0.2067", "0.9412", "+0.7345", "+0.7 … +0.77", "better"]
    stop = tab.locator('#eval-generation tr[data-generation="stop_rate"] td').all_inner_texts()
    assert stop == ["0%", "100%"]
    mcq = tab.locator('#eval-benchmarks tr[data-benchmark="mcq"] td').all_inner_texts()
    assert mcq == ["35%", "50%", "+0.15", "-0.05 … +0.35", "no measurable difference"]
    assert tab.locator("#evaluation details.qa").count() == 12

    # Artifacts: the exported files with size, sha256, smoke answers and a working link.
    lora = tab.locator('#artifacts .artifact[data-entry="lora"]')
    row = lora.locator('tr[data-file="adapter_model.safetensors"]')
    cells = row.locator("td").all_inner_texts()
    weights = local.home / "jobs" / job_id / "adapter" / "adapter_model.safetensors"
    assert cells[1] == "4.0 KiB" and cells[2] == hashlib.sha256(weights.read_bytes()).hexdigest()
    href = row.locator("a.download").get_attribute("href")
    assert href == f"/jobs/{job_id}/artifacts/lora/adapter_model.safetensors"
    assert httpx.get(local.url + href).content == weights.read_bytes()
    assert "stopped at end of turn" in lora.inner_text()
    gguf = tab.locator('#artifacts .artifact[data-entry="gguf_q4_k_m"]')
    assert gguf.locator('tr[data-file="model-q4_k_m.gguf"]').count() == 1
    failed = tab.inner_text('#artifacts .artifact[data-entry="merged_4bit"]')
    assert "export_requires_cuda: bitsandbytes 4-bit needs CUDA here" in failed
    assert str(local.home) not in tab.inner_text("#artifacts")  # no server paths

    # Notes said twice are shown once; the charts hold every row.
    notes = tab.locator("#job-notes li").all_inner_texts()
    assert notes == ["export lora: ok (2 times)", "evaluation: 12 questions"]
    for chart, count in (("loss-chart", 20), ("lr-chart", 20), ("tps-chart", 20)):
        assert tab.get_attribute(f"#{chart}", "data-points") == str(count)
    assert tab.get_attribute("#loss-chart", "data-eval-points") == "4"
    assert tab.get_attribute("#memory-chart", "data-peak-points") == "20"
    # Axis labels fit their margin: whole megabytes, not 970.0000.
    labels = tab.eval_on_selector_all("#memory-chart text", "els => els.map(e => e.textContent)")
    assert "970" in labels and "901" in labels
    assert tab.locator("#preference-charts").is_hidden()  # an sft job has no rewards
    tab.screenshot(path=str(SCREENSHOT.with_name("medtune-dashboard-cards.png")), full_page=True)


def test_a_preference_job_charts_its_rewards(tab: Any, local: Local) -> None:
    spec = recipe_spec("sample:medical_preference", method="dpo")
    job_id = finished_job(local, {}, spec)
    # The rewards TRL logs with each step's row, and the held-out pairs' every 5 steps.
    rows: list[dict[str, Any]] = [
        {
            "step": n,
            "rewards_chosen": 0.01 * n,
            "rewards_rejected": -0.02 * n,
            "rewards_margin": 0.03 * n,
            "rewards_accuracy": min(1.0, 0.5 + 0.05 * n),
        }
        for n in range(1, 21)
    ]
    for row in rows[4::5]:
        row.update(eval_rewards_margin=row["step"] / 100, eval_rewards_accuracy=0.75)
    with session_scope(local.db_url) as s:
        jobs.add_metrics(s, job_id, rows)
    tab.goto(f"/#/jobs/{job_id}")
    card = tab.locator('#preference-charts[data-method="dpo"]')
    card.wait_for()
    tab.wait_for_function("() => +document.querySelector('#margin-chart').dataset.points === 20")
    counts = {
        (chart, series): tab.get_attribute(f"#{chart}", f"data-{series}points")
        for chart, series in (
            ("rewards-chart", ""),
            ("rewards-chart", "rejected-"),
            ("margin-chart", "eval-"),
            ("accuracy-chart", ""),
            ("accuracy-chart", "eval-"),
        )
    }
    assert list(counts.values()) == ["20", "20", "4", "20", "4"], counts
    assert tab.locator("#rewards-chart polyline.series-rejected").count() == 1
    assert tab.inner_text("#rewards-now") == "0.2 vs -0.4"
    assert tab.inner_text("#margin-now") == "0.6 · eval 0.2"
    assert tab.inner_text("#accuracy-now") == "1 · eval 0.75"
    legend = tab.eval_on_selector_all("#rewards-chart text", "els => els.map(e => e.textContent)")
    assert "chosen · rejected" in legend
    text = tab.inner_text("#preference-charts")
    assert "undefined" not in text and "NaN" not in text
    assert tab.get_attribute("#loss-chart", "data-points") == "20"  # the loss as for sft
    card.screenshot(path=str(SCREENSHOT.with_name("medtune-dashboard-rewards.png")))


def test_a_failed_gate_lists_its_problems(tab: Any, local: Local) -> None:
    job_id = finished_job(local, {})
    with session_scope(local.db_url) as s:
        job = jobs.get_job(s, job_id)
        job.dataset_stats = {**MIX_STATS, "gate": FAILED_GATE, "dropped": {}, "dropped_total": 0}
        s.add(job)
        s.commit()
    tab.goto(f"/#/jobs/{job_id}")
    tab.locator("#gate").wait_for()
    assert tab.get_attribute("#gate", "data-passed") == "false"
    assert tab.inner_text('#dataset-stats > table.kv tr[data-key="dropped"] td') == "none"
    problems = tab.locator("#gate li").all_inner_texts()
    assert problems == [
        "no_end_of_turn (example 3): the answer is not closed",
        "truncated_share: 41% of examples truncated",
    ]


def test_the_eta_leaves_an_outage_out(tab: Any, local: Local) -> None:
    tab.goto("/")
    rows = [{"step": n, "created_at": f"2026-01-01T00:00:{2 * n:02d}Z"} for n in range(1, 11)]
    rows += [
        {"step": n, "created_at": f"2026-01-01T00:10:{2 * (n - 10):02d}Z"} for n in range(11, 16)
    ]
    per_step, eta = tab.evaluate(
        """async (rows) => {
            const util = await import("/static/util.js");
            return [util.secondsPerStep(rows), util.etaSeconds(rows, 60)];
        }""",
        rows,
    )
    assert per_step == pytest.approx(2.0) and eta == pytest.approx(90.0)
    # A step-0 row (the held-out loss before training) logged 90 s before step 1.
    late_start = [{"step": 0, "created_at": "2026-01-01T00:00:00Z"}] + [
        {"step": n, "created_at": f"2026-01-01T00:01:{30 + 2 * n:02d}Z"} for n in range(1, 8)
    ]
    first = tab.evaluate(
        'async (rows) => (await import("/static/util.js")).secondsPerStep(rows)', late_start
    )
    assert first == pytest.approx(2.0)


def test_the_new_job_form_checks_through_the_api(tab: Any, local: Local) -> None:
    tab.goto("/")
    tab.click("#new-job")
    editor = tab.locator("#spec-editor")
    editor.wait_for()
    assert json.loads(editor.input_value()) == spec_example()  # the README's recipe spec

    spec = spec_example()
    spec["training_config"]["learning_rate"] = 0
    editor.fill(json.dumps(spec))
    tab.click("#spec-submit")
    refused = tab.locator('#spec-result [data-state="invalid"]')
    refused.wait_for()
    assert refused.get_attribute("data-code") == "out_of_range"
    field = refused.locator('li[data-field="training_config.learning_rate"]')
    assert "greater than 0" in field.inner_text()

    editor.fill('{"model_config": {')
    tab.click("#spec-submit")
    assert tab.get_attribute('#spec-result [data-state="invalid"]', "data-code") == "invalid_json"

    tab.click("#spec-reset")
    tab.click("#spec-submit")
    tab.wait_for_url("**/#/jobs/job_*")
    job_id = tab.url.rsplit("/", 1)[1]
    assert httpx.get(f"{local.url}/jobs/{job_id}").json()["finetuned_model"] == "smollm2-medical"
