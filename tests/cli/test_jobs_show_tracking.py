"""`medtune jobs show` says where a job's tracker runs are."""

from __future__ import annotations

from typing import Any

from cli.jobs import show_text


def _job(**fields: Any) -> dict[str, Any]:
    return {
        "id": "job_0123456789abcdef01234567",
        "status": "succeeded",
        "base_model": "smollm2-135m-instruct",
        "finetuned_model": "smollm2-medical",
        "steps_done": 3,
        "steps_total": 3,
        "artifacts": {},
        **fields,
    }


def test_jobs_show_prints_each_trackers_run() -> None:
    shown = show_text(
        _job(
            tracking={
                "mlflow": {
                    "tracking_uri": "https://********@mlflow.internal",
                    "experiment_id": "1",
                    "run_id": "abc123",
                },
                "wandb": {
                    "project": "medtune",
                    "entity": "lab",
                    "run_id": "job_0123456789abcdef01234567",
                    "url": "https://wandb.ai/lab/medtune/runs/job_0123456789abcdef01234567",
                    "dir": "/data/jobs/job_0123456789abcdef01234567/wandb/run-x",
                    "mode": "online",
                },
            }
        )
    )
    lines = shown.splitlines()
    assert "  mlflow    run abc123 at https://********@mlflow.internal" in lines
    assert (
        "  wandb     run job_0123456789abcdef01234567 (online) at "
        "https://wandb.ai/lab/medtune/runs/job_0123456789abcdef01234567"
    ) in lines
    # Without trackers (TensorBoard only), no such lines.
    assert not any(
        line.lstrip().startswith(("mlflow", "wandb")) for line in show_text(_job()).splitlines()
    )
