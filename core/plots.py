"""A job's training curves as PNG files, for people who look at files rather than dashboards.

``training.png``: loss and eval loss on one chart, the learning rate beneath it (same steps).
``throughput.png``: tokens/s and memory (in use, peak) over the run's time.

Written at the end of a job into ``<job dir>/plots/`` (:func:`write_job_plots`, from
core/pipeline.py) and by ``medtune jobs plot`` from the API's metric rows. matplotlib's headless
Agg backend: no display, no GUI toolkit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
TRAINING_PNG = "training.png"
THROUGHPUT_PNG = "throughput.png"


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _stamp(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def _minutes(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(minutes since the first row, value): the x axis of the throughput chart."""
    stamped = [(_stamp(r.get("created_at")), r.get(key)) for r in rows]
    stamped = [(t, v) for t, v in stamped if t is not None and v is not None]
    if not stamped:
        return [], []
    start = min(t for t, _ in stamped)
    return [(t - start).total_seconds() / 60 for t, _ in stamped], [float(v) for _, v in stamped]


def _training(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    loss_ax.plot(*_series(rows, "loss"), label="training loss", color="#2563eb")
    steps, evals = _series(rows, "eval_loss")
    if steps:
        loss_ax.plot(steps, evals, "o--", label="eval loss (held out)", color="#d97706")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(title)
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(*_series(rows, "learning_rate"), color="#9333ea")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.grid(alpha=0.3)
    figure.savefig(path)


def _throughput(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    tps_ax, mem_ax = figure.subplots(2, 1, sharex=True)
    tps_ax.plot(*_minutes(rows, "tokens_per_second"), color="#15803d")
    tps_ax.set_ylabel("tokens / s (trained)")
    tps_ax.set_title(title)
    tps_ax.grid(alpha=0.3)
    for key, label, style in (("memory_mb", "in use", "-"), ("peak_memory_mb", "peak", "--")):
        minutes, values = _minutes(rows, key)
        if minutes:
            mem_ax.plot(minutes, values, style, label=label)
    mem_ax.set_ylabel("memory (MB)")
    mem_ax.set_xlabel("minutes since the first logged step")
    if mem_ax.lines:
        mem_ax.legend()
    mem_ax.grid(alpha=0.3)
    figure.savefig(path)


def write_plots(rows: Sequence[dict[str, Any]], folder: Path, *, title: str) -> list[Path]:
    """Write both PNGs for these metric rows into ``folder``; the paths written (none without
    rows). Each file is written under a temporary name and renamed, so it is whole or absent."""
    if not rows:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: int(r["step"]))
    written = []
    for name, draw in ((TRAINING_PNG, _training), (THROUGHPUT_PNG, _throughput)):
        target = folder / name
        partial = folder / f".{name}.part.png"
        draw(rows, partial, title)
        partial.replace(target)
        written.append(target)
    return written


def write_job_plots(db_url: str, job_id: str, job_dir: Path) -> list[Path]:
    """The job's stored metric rows as PNGs in ``<job_dir>/plots``. Never fails the job: a plot
    is a convenience, so a problem is logged and nothing is written."""
    from core.store import jobs
    from core.store.db import session_scope

    try:
        rows: list[dict[str, Any]] = []
        with session_scope(db_url) as s:
            after = -1
            while True:
                page, more = jobs.metrics_page(s, job_id, after_step=after, limit=1000)
                rows += [{"created_at": r.created_at, **_values(r)} for r in page]
                if not more or not page:
                    break
                after = page[-1].step
        return write_plots(rows, job_dir / PLOTS_DIR, title=f"job {job_id}")
    except Exception:
        log.warning("job %s: the training plots could not be written", job_id, exc_info=True)
        return []


def _values(row: Any) -> dict[str, Any]:
    from core.store.jobs import METRIC_FIELDS

    return {"step": row.step, **{key: getattr(row, key) for key in METRIC_FIELDS}}
