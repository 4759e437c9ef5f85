"""core.plots: a job's curves as PNGs (loss with eval loss, learning rate; tokens/s, memory)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from core.plots import THROUGHPUT_PNG, TRAINING_PNG, write_job_plots, write_plots
from core.spec import JobSpec
from core.store import jobs
from core.store.db import session_scope
from core.store.migrate import upgrade
from tests.helpers import recipe_spec
from tests.job_files import metric_rows

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def pixels_of(path: Path, hex_colour: str) -> int:
    """How many pixels are (about) this colour: a series that was drawn leaves some."""
    image = imread(path)[..., :3]
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image - rgb).max(axis=-1) < 0.08).sum())


def test_both_pngs_hold_their_series(tmp_path: Path) -> None:
    written = write_plots(metric_rows(30, start=T0), tmp_path / "plots", title="job x")
    assert [p.name for p in written] == [TRAINING_PNG, THROUGHPUT_PNG]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(path).shape[:2] == (600, 800)
    training, throughput = written
    assert pixels_of(training, "#2563eb") > 200  # loss
    assert pixels_of(training, "#d97706") > 50  # eval loss, every 5 steps
    assert pixels_of(training, "#9333ea") > 200  # learning rate
    assert pixels_of(throughput, "#15803d") > 200  # tokens/s
    assert not list((tmp_path / "plots").glob(".*"))  # no partial file left


def test_without_eval_rows_there_is_no_eval_line(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "eval_loss"} for r in metric_rows(10, start=T0)]
    training, _ = write_plots(rows, tmp_path, title="job x")
    assert pixels_of(training, "#d97706") == 0


def test_no_rows_no_files(tmp_path: Path) -> None:
    assert write_plots([], tmp_path / "plots", title="job x") == []
    assert not (tmp_path / "plots").exists()


def test_a_jobs_stored_rows_become_its_plots(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    with session_scope(url) as s:
        job = jobs.create_job(s, JobSpec.model_validate(recipe_spec("sample:medical_qa")))
        job_id = job.id
        jobs.add_metrics(s, job_id, metric_rows(1200, start=T0, seconds_per_step=0.5))
    written = write_job_plots(url, job_id, tmp_path / "job")
    assert [p.relative_to(tmp_path) for p in written] == [
        Path("job/plots/training.png"),
        Path("job/plots/throughput.png"),
    ]


def test_a_plot_problem_never_fails_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert write_job_plots(f"sqlite:///{tmp_path / 'none' / 'x.db'}", "job_x", tmp_path) == []
    assert "could not be written" in caplog.text


@pytest.mark.slow
def test_a_job_that_ran_has_its_plots(tmp_path: Path, model_cache: Path) -> None:
    from core.pipeline import run_job
    from core.settings import Settings
    from core.store.models import JobStatus

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    spec = recipe_spec("sample:medical_qa", max_steps=3, save_steps=0)
    spec["training_dataset"]["max_samples"] = 16
    with session_scope(url) as s:
        job_id = jobs.create_job(s, JobSpec.model_validate(spec)).id
    settings = Settings(home=tmp_path / "home", database_url=url, model_cache=model_cache)
    assert run_job(job_id, settings, worker="w") == JobStatus.succeeded
    plots = settings.artifacts_dir / job_id / "plots"
    assert sorted(p.name for p in plots.iterdir()) == [THROUGHPUT_PNG, TRAINING_PNG]
    assert pixels_of(plots / TRAINING_PNG, "#2563eb") > 100  # three steps of loss
