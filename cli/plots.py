"""``medtune jobs plot JOB``: the job's curves as PNGs here, drawn from the API's metric rows
(the same files a job writes into its own folder at the end: core.plots)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cli.client import MedtuneClient
from cli.output import bind, print_json


def all_rows(client: MedtuneClient, job_id: str) -> list[dict[str, Any]]:
    page = client.metrics(job_id, limit=1000)
    rows = list(page["data"])
    while page["has_more"]:
        page = client.metrics(job_id, after_step=page["last_step"], limit=1000)
        rows += page["data"]
    return rows


def cmd_plot(args: argparse.Namespace, client: MedtuneClient) -> int:
    from core.plots import write_plots  # matplotlib loads only for this command

    job = client.get_job(args.job_id)  # a wrong id is the API's 404, before any drawing
    rows = all_rows(client, args.job_id)
    folder = Path(args.output or f"{args.job_id}-plots")
    written = write_plots(rows, folder, title=f"job {job['id']} ({job['finetuned_model']})")
    if args.json:
        print_json({"job_id": job["id"], "rows": len(rows), "files": [str(p) for p in written]})
    elif not written:
        print(f"no metric rows yet (job {job['status']}): nothing to plot")
    else:
        for path in written:
            print(path)
    return 0


def register(jobs_sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``jobs plot`` to ``medtune jobs``."""
    plot = jobs_sub.add_parser(
        "plot",
        parents=[common],
        help="loss and eval loss with the learning rate, tokens/s and memory, as PNG files",
    )
    plot.add_argument("job_id")
    plot.add_argument("-o", "--output", help="folder for the PNGs (default: JOB_ID-plots)")
    plot.set_defaults(func=bind(cmd_plot))
