"""The dashboard: served next to the API (in-process), and driven in headless Chromium against the
live stack (real Postgres, Redis, Celery worker and SmolLM2)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.main import STATIC_DIR
from tests.api.test_api import Api, assert_problem
from tests.api.test_api import api as api  # the in-process API fixture
from tests.conftest import Stack
from tests.helpers import recipe_spec, tiny_dataset, wait_status

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
    assert '<script src="/static/app.js"' in page.text
    for asset in ("/static/app.js", "/static/app.css"):
        assert api.client.get(asset).status_code == 200
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
    assert {f.name for f in files} == {"index.html", "app.js", "app.css"}
    for path in files:
        text = path.read_text(encoding="utf-8")
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        assert "@import" not in text and "import(" not in text


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
    assert page.inner_text("#adapter-path") == final["artifacts"]["adapter"]
    page.locator("#dataset-stats").wait_for()
    examples = page.inner_text('#dataset-stats tr[data-key="examples"] td')
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
