"""A job's stages, run by a worker: prepare data, train LoRA, save the adapter.

The job row is re-read and claimed first, so a duplicate delivery of the same job does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core import job_start
from core.base_models import allowed_model_roots, hub_call, resolve
from core.continuation import adapter_path
from core.data.preference import prepare_job
from core.data.prepare import Prepared
from core.data.tokenize import ensure_chat_template
from core.errors import LeaseLost, MedtuneError, OutOfMemory
from core.inference.warm import send_freed, send_warm
from core.job_metrics import end_tracking, job_sink, start_tracking
from core.plots import write_job_plots
from core.settings import Settings
from core.spec.job import JobSpec, public_spec
from core.storage import storage_error
from core.store import jobs
from core.store.db import session_scope
from core.store.lease import LeaseKeeper
from core.store.models import JobStage, JobStatus
from core.training.checkpointing import with_checkpointing
from core.training.tracking import JobTracking

log = logging.getLogger(__name__)


def _prepare_data(spec: JobSpec, model_path: str) -> Prepared:
    """Load, clean, render and tokenize; the gate fails the job on the first bad example."""
    from transformers import AutoTokenizer

    tokenizer = hub_call(
        spec.model.base_model,
        AutoTokenizer.from_pretrained,
        model_path,
        revision=spec.model.revision,
    )
    return prepare_job(spec, tokenizer)  # sft examples, or dpo / orpo pairs


def _save_adapter(loaded: Any, target: Path) -> None:
    """Write to a temporary sibling, then rename: a reader never sees half an adapter."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(str(tmp))
    loaded.tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def run_job(job_id: str, settings: Settings, *, worker: str) -> str:
    """Run one job to a terminal status and return it."""
    url = settings.db_url
    with session_scope(url) as s:
        if not jobs.claim(s, job_id, worker=worker, lease_s=settings.lease_seconds):
            status = jobs.get_job(s, job_id).status
            log.info("job %s not claimed (status %s)", job_id, status)
            return status
        spec = JobSpec.model_validate(jobs.get_job(s, job_id).spec)
    job_dir = settings.artifacts_dir / job_id
    tracking = None
    owner: str | None = job_id  # whose reservation the end releases (not a job lost to another)
    try:
        with LeaseKeeper(url, job_id, worker=worker, lease_s=settings.lease_seconds) as lease:
            job_dir.mkdir(parents=True, exist_ok=True)
            tracking = start_tracking(settings, job_id, spec, job_dir)
            return _run_stages(job_id, spec, job_dir, settings, lease=lease, tracking=tracking)
    except LeaseLost as exc:  # the job is another worker's now: touch nothing of it
        log.warning("job %s abandoned: %s", job_id, exc.detail)
        tracking = None  # its runs go on with the worker that holds the job now
        owner = None  # so does its reservation on the inference worker
        return JobStatus.queued
    except MedtuneError as exc:
        log.warning("job %s failed: %s %s", job_id, exc.code, exc.detail)
        _finish(
            url,
            job_id,
            JobStatus.failed,
            worker=worker,
            error_code=exc.code,
            error_message=exc.detail,
        )
    except Exception as exc:
        storage = storage_error(exc, job_dir)
        if storage is not None:  # a full or read-only volume: say so, keep what was complete
            log.warning("job %s failed: %s (%s)", job_id, storage.code, exc)
            _drop_staging(job_dir / spec.training.output_dir)
            _finish(
                url,
                job_id,
                JobStatus.failed,
                worker=worker,
                error_code=storage.code,
                error_message=storage.detail,
            )
            return JobStatus.failed
        log.exception("job %s crashed", job_id)
        _finish(
            url,
            job_id,
            JobStatus.failed,
            worker=worker,
            error_code="internal_error",
            error_message=f"{type(exc).__name__}: {str(exc)[:500]}",
        )
    finally:
        if tracking is not None:  # runs a succeeded or cancelled job left open: none
            end_tracking(url, job_id, tracking, JobStatus.failed)
        # Whatever the outcome, the job's adapter, optimizer state and gradients go now (not at
        # the next job's start: a failed job's would hold the card meanwhile); the base stays.
        _give_back(job_id)
        # Then the inference workers drop the job's reservation and retry refused fast builds.
        send_freed(settings, job_id=owner, why=f"training job {job_id} ended")
    return JobStatus.failed


def _give_back(job_id: str) -> None:
    try:
        job_start.give_back()
    except Exception:  # the job has its status already: a failed restore must not change it
        log.exception("job %s: its model was not handed back", job_id)


def _drop_staging(output_dir: Path) -> None:
    """Free the space a half-written checkpoint took; complete checkpoints stay."""
    from core.training import checkpoints

    shutil.rmtree(checkpoints.checkpoint_dir(output_dir) / checkpoints.STAGING, ignore_errors=True)


def _finish(url: str, job_id: str, status: JobStatus, *, worker: str, **values: Any) -> None:
    with session_scope(url) as s:
        jobs.finish(s, job_id, status, worker=worker, **values)


def _note(url: str, job_id: str, *notes: str) -> None:
    with session_scope(url) as s:
        for note in notes:
            jobs.add_note(s, job_id, note)


class StageClock:
    """Wall seconds of each stage of this attempt, written to the job row (``stage_seconds``)
    whenever a stage starts, so GET /jobs/{id} shows where a running job's time went."""

    def __init__(self, url: str, job_id: str) -> None:
        self.url, self.job_id = url, job_id
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._mark = time.perf_counter()

    def start(self, name: str | None, **fields: Any) -> None:
        """End the current stage, begin ``name`` (None: just end), and store both."""
        now = time.perf_counter()
        if self._current is not None:
            spent = self.seconds.get(self._current, 0.0) + now - self._mark
            self.seconds[self._current] = round(spent, 3)
        self._current, self._mark = name, now
        with session_scope(self.url) as s:
            jobs.set_fields(s, self.job_id, stage_seconds=dict(self.seconds), **fields)


def _run_stages(
    job_id: str,
    spec: JobSpec,
    job_dir: Path,
    settings: Settings,
    *,
    lease: LeaseKeeper,
    tracking: JobTracking,
) -> str:
    from core.training import engines

    url = settings.db_url
    clock = StageClock(url, job_id)
    clock.start("preparing_data", stage=JobStage.preparing_data, artifacts_dir=str(job_dir))
    model_path = resolve(
        spec.model.base_model, models_dir=settings.models_dir, roots=allowed_model_roots(settings)
    )

    # The data is prepared while the model loads; the worker's kept base is reused if it fits.
    def load_model(step_tokens: Any = None, *, skip: bool = True) -> Any:
        return engines.load(
            spec,
            model_path,
            init_adapter=adapter_path(url, spec),
            keep=settings.keep_base_model,
            skip_checkpointing=skip and settings.skip_checkpointing_when_room,
            step_tokens=step_tokens,
        )

    prepared, loaded = job_start.data_and_model(
        job_id,
        spec,
        model_path,
        settings=settings,
        job_dir=job_dir,
        clock=clock,
        load_model=load_model,
    )
    ensure_chat_template(loaded.tokenizer, spec.dataset.chat_template)
    clock.start("training", engine=loaded.engine)
    trained = with_checkpointing(spec, loaded.checkpointing)  # its memory: what the card keeps
    send_warm(
        settings,
        trained,
        job_id=job_id,
        model_path=model_path,
        engine=loaded.engine,
        tokens=loaded.step_tokens,
    )
    _note(url, job_id, *loaded.notes)
    outcome = _train_with_recovery(
        job_id,
        spec,
        loaded,
        prepared.train,
        job_dir,
        url,
        eval_items=prepared.validation,
        lease=lease,
        tracking=tracking,
        with_checkpointing=lambda: load_model(skip=False),
    )
    lease.check()
    _note(url, job_id, *outcome.notes)
    # Saved before the evaluation: a crash there must not cost the trained adapter.
    adapter_dir = job_dir / "adapter"
    _save_adapter(loaded, adapter_dir)
    if spec.evaluation.enabled and not outcome.cancelled:
        clock.start("evaluating")
        _evaluate(job_id, spec, loaded, prepared, job_dir, url)
    clock.start("exporting", stage=JobStage.exporting)
    lease.check()
    tracking.log_folder(adapter_dir, name="adapter")
    if not outcome.cancelled:
        send_warm(settings, spec, job_id=job_id, adapter_dir=str(adapter_dir))
        _export(job_id, spec, loaded, job_dir, adapter_dir, model_path, url)
    # The webhook secret masked: the job folder is copied and shared; the row keeps the secret.
    (job_dir / "spec.json").write_text(json.dumps(public_spec(spec.to_json()), indent=2))
    clock.start(None)
    write_job_plots(url, job_id, job_dir)  # plots/training.png, throughput.png; never raises
    status = JobStatus.cancelled if outcome.cancelled else JobStatus.succeeded
    end_tracking(url, job_id, tracking, status)
    _finish(
        url,
        job_id,
        status,
        worker=lease.worker,
        adapter_dir=str(adapter_dir),
        steps_done=outcome.steps,
        stop_reason=outcome.stop_reason,
        kept_step=outcome.kept_step,
    )
    # run_job hands the model back once the job is reported (the base stays loaded).
    log.info(
        "job %s %s after %d steps (loss %s)", job_id, status, outcome.steps, outcome.final_loss
    )
    return status


def _export(
    job_id: str,
    spec: JobSpec,
    loaded: Any,
    job_dir: Path,
    adapter_dir: Path,
    model_path: str,
    url: str,
) -> None:
    from core.export.run import export_for_spec

    lines = export_for_spec(
        loaded, spec, job_dir=job_dir, adapter_dir=adapter_dir, base_path=model_path
    )
    _note(url, job_id, *lines)


def _evaluate(
    job_id: str, spec: JobSpec, loaded: Any, prepared: Prepared, job_dir: Path, url: str
) -> None:
    from core.evaluation.job import evaluate_job  # scoring libraries load only when evaluating

    if not prepared.validation_examples:
        _note(
            url,
            job_id,
            "evaluation skipped: no held-out examples; give a validation_dataset or set "
            "training_dataset.validation_share",
        )
        return
    with session_scope(url) as s:
        jobs.set_fields(s, job_id, stage=JobStage.evaluating)
    _note(url, job_id, evaluate_job(spec, loaded, prepared, job_dir))


def _train_with_recovery(
    job_id: str,
    spec: JobSpec,
    loaded: Any,
    items: list[Any],
    job_dir: Path,
    url: str,
    *,
    eval_items: list[Any],
    lease: LeaseKeeper,
    tracking: JobTracking | None = None,
    with_checkpointing: Callable[[], Any] | None = None,
) -> Any:
    """Train, resuming from the last checkpoint after a lost worker or a CUDA out-of-memory.

    Out of memory: a job the worker trained without the gradient checkpointing it asked for
    retries with it (``with_checkpointing`` loads its adapter so); then from the last checkpoint
    with half the micro-batch and twice the gradient accumulation (the same effective batch)
    until the micro-batch is 1.
    """
    import torch

    from core.training import checkpoints, engines, preference, trainer
    from core.training.checkpointing import skipped

    fit = trainer.train if spec.training.method == "sft" else preference.train  # dpo, orpo: TRL

    output_dir = job_dir / spec.training.output_dir
    resume = checkpoints.latest(checkpoints.checkpoint_dir(output_dir))
    if resume:
        with session_scope(url) as s:
            jobs.delete_metrics_after(s, job_id, resume.step)
        _note(url, job_id, f"resumed from checkpoint-{resume.step}")
    while True:
        sink = job_sink(
            url,
            job_id,
            job_dir=job_dir,
            resume_step=resume.step if resume else 0,
            lease_check=lease.check,
            tracking=tracking,
        )
        try:
            return fit(
                spec,
                loaded,
                items,
                output_dir=output_dir,
                sink=sink,
                resume_from=resume.path if resume else None,
                eval_items=eval_items,
            )
        except torch.cuda.OutOfMemoryError as exc:
            # Its last rows land now, before the rows past the checkpoint are dropped below.
            sink.close()
            cfg = spec.training
            if with_checkpointing is not None and skipped(spec, loaded):
                del exc  # its traceback holds the failed step's tensors
                engines.reload_into(loaded, with_checkpointing)
                retry = "with gradient checkpointing, which the worker had skipped"
            elif cfg.per_device_train_batch_size == 1:
                raise OutOfMemory(
                    "CUDA ran out of memory even at per_device_train_batch_size 1; lower "
                    "model_config.max_seq_length or use a GPU with more memory",
                    field="training_config.per_device_train_batch_size",
                ) from exc
            else:
                batch = cfg.per_device_train_batch_size // 2
                accumulation = cfg.gradient_accumulation_steps * 2
                spec = spec.model_copy(
                    update={
                        "training": cfg.model_copy(
                            update={
                                "per_device_train_batch_size": batch,
                                "gradient_accumulation_steps": accumulation,
                            }
                        )
                    }
                )
                retry = f"with micro-batch {batch} x {accumulation} accumulation"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            resume = checkpoints.latest(checkpoints.checkpoint_dir(output_dir))
            step = resume.step if resume else 0
            with session_scope(url) as s:
                jobs.delete_metrics_after(s, job_id, step)
            _note(url, job_id, f"CUDA out of memory; retrying from step {step} {retry}")
        finally:
            sink.close()
