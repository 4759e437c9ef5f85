"""Load a job's model on the inference workers before anyone asks (issue #14).

A training worker sends ``WARM_TASK`` (core/queue.py, routed to the inference queue) twice per
job: when the job starts training (load its base: the inference worker loads it while the job
trains, tens of seconds on an 8B) and when its adapter is saved (attach it), which is before
the job's status turns ``succeeded``. The first answer then loads nothing. The adapter's fast
path (core/inference/fast.py) is built only after that first answer, so as not to compete with
it for the card. An inference worker may also load a
configured base when it starts (``MEDTUNE_INFER_PRELOAD``).

On CUDA the worker first checks that its card holds the base beside what a training job on the
same card may still take (the job's memory estimate; the message names the training card by
its UUID, so a worker on another card reserves nothing). When it does not, nothing is loaded
and the worker logs why: the first answer then loads the base, as before. The estimate stays
reserved for that job (core/inference/reserve.py: a message about another job leaves it alone)
until its training worker sends ``FREED_TASK`` when the job has ended, whatever its outcome, and
its memory is handed back; a later export sends one too. The inference worker then plans again
the fast builds it refused for room (core/inference/fast.py, ``FastPaths.retry``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from core.inference.fast import inference_bytes, model_shape, room
from core.memory import GIB
from core.queue import FREED_TASK, INFER_QUEUE, WARM_TASK, make_celery
from core.settings import Settings

log = logging.getLogger(__name__)

WARM_CACHE_TOKENS = 2048  # a generation's KV cache, for the estimate of a warm base


def cuda_device_uuid() -> str | None:
    """This process's card, as the inference worker can compare it (None without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(0).uuid)
    except Exception:  # an old torch without uuid: the worker then reserves the estimate
        return None


def warm_kwargs(
    spec: Any,
    *,
    job_id: str,
    adapter_dir: str | None = None,
    training_gib: float | None = None,
) -> dict[str, Any]:
    """The warm task's arguments for a job (``spec``: its JobSpec)."""
    return {
        "base_model": spec.model.base_model,
        "load_in_4bit": bool(spec.model.load_in_4bit),
        "adapter_dir": adapter_dir,
        "adapter_name": job_id if adapter_dir else None,
        # While the job trains its memory may still grow: the worker keeps room for it.
        "training": None
        if adapter_dir
        else {
            "device": cuda_device_uuid(),
            "gib": training_gib,
            "job_id": job_id,
            # The process that trains it runs one job at a time: a later job's reservation from
            # it replaces this one, should the message that releases this one be lost.
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        },
    }


def send_warm(
    settings: Settings,
    spec: Any,
    *,
    job_id: str,
    adapter_dir: str | None = None,
    model_path: str | None = None,
    engine: str = "unsloth",
    tokens: int | None = None,
) -> None:
    """Ask the inference workers to load the job's base (with ``model_path`` and the training
    ``engine``: its estimate is reserved, for micro-batches of ``tokens`` where the job's rows
    are known) or its adapter. Never raises: a lost message costs only the first answer's
    speed."""
    if not settings.infer_warm:
        return
    try:
        training = model_path and not adapter_dir
        gib = _training_gib(spec, model_path, engine, tokens) if training else None
        kwargs = warm_kwargs(spec, job_id=job_id, adapter_dir=adapter_dir, training_gib=gib)
        _sender(settings).send_task(
            WARM_TASK, kwargs=kwargs, queue=INFER_QUEUE, ignore_result=True, retry=False
        )
    except Exception as exc:
        log.warning("job %s: warm message not sent (%s)", job_id, exc)


def send_freed(settings: Settings, *, why: str, job_id: str | None = None) -> None:
    """Tell the inference workers that this training worker freed memory: ``job_id`` ended (its
    reservation goes) or a later export did. Never raises."""
    if not settings.infer_warm:
        return
    try:
        kwargs = {"job_id": job_id, "device": cuda_device_uuid(), "why": why}
        _sender(settings).send_task(
            FREED_TASK, kwargs=kwargs, queue=INFER_QUEUE, ignore_result=True, retry=False
        )
    except Exception as exc:
        log.warning("memory-freed message not sent (%s: %s)", why, exc)


_senders: dict[str, Any] = {}


def _sender(settings: Settings) -> Any:
    """One Celery app per broker for this process's warm messages (its connection pool)."""
    url = settings.celery_broker_url
    if url not in _senders:
        _senders[url] = make_celery(settings)
    return _senders[url]


def reserved_bytes(training: dict[str, Any] | None, *, my_device: str | None) -> int:
    """What a training job named in a warm message may still take on this card."""
    if not training or not training.get("gib"):
        return 0
    if training.get("device") and my_device and training["device"] != my_device:
        return 0  # it trains on another card
    return int(float(training["gib"]) * GIB)


def why_not(
    base_path: str,
    *,
    load_in_4bit: bool,
    reserved: int,
    memory: tuple[int, int],
) -> str | None:
    """None if the card holds the inference base beside ``reserved``; else why not."""
    shape = model_shape(base_path)
    if shape is None:
        return None  # no config to size it by (a Hub id not yet downloaded): try
    need = inference_bytes(shape, four_bit=load_in_4bit, cache_tokens=WARM_CACHE_TOKENS)
    free, total = memory
    return room(need, free=free, total=total, reserved=reserved)


def warm(
    engine: Any,
    *,
    base_model: str,
    load_in_4bit: bool = True,
    adapter_dir: str | None = None,
    adapter_name: str | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the warm task does on an inference worker; returns what happened (for its log)."""
    from core.base_models import resolve

    if engine.cuda:
        from core.inference.fast import gpu_memory

        _reserve(engine.fast, training, reserved_bytes(training, my_device=cuda_device_uuid()))
        reserved = engine.fast.reserved  # every source's, not only this message's
        path = resolve(base_model, models_dir=engine.models_dir)
        if not engine.has_base(base_model, load_in_4bit=load_in_4bit):
            why = why_not(path, load_in_4bit=load_in_4bit, reserved=reserved, memory=gpu_memory())
            if why is not None:
                log.info("not warming %s: %s", base_model, why)
                return {"warmed": False, "why": why}
    done = engine.warm(
        base_model, load_in_4bit=load_in_4bit, adapter_dir=adapter_dir, adapter_name=adapter_name
    ).result()
    log.info(
        "warmed %s%s: loads %s",
        base_model,
        f" + {adapter_name}" if adapter_name else "",
        done["loads"],
    )
    return {"warmed": True, **done}


def _reserve(fast: Any, training: dict[str, Any] | None, nbytes: int) -> None:
    """Keep ``nbytes`` for the training job the message names (until it ends), or standing for
    one that may come (preload). A message that reserves nothing changes nothing: the adapter
    message, or a job on another card, never clobbers another job's reservation."""
    if not training or nbytes <= 0:
        return
    if training.get("job_id"):
        fast.reserve(str(training["job_id"]), nbytes, worker=training.get("worker"))
    else:
        fast.reservations.stand("preload", nbytes)


def freed(
    engine: Any, *, job_id: str | None = None, device: str | None = None, why: str = "freed"
) -> dict[str, Any]:
    """What ``FREED_TASK`` does on an inference worker: the ended job's reservation goes, and
    the fast builds refused for room are planned once more (if the memory was freed on this
    card, or the reservation was held here)."""
    if not engine.cuda:
        return {"released": False, "queued": 0}
    released = bool(job_id) and engine.fast.release(str(job_id))
    if released:
        log.info("training job %s released its reservation (%s)", job_id, why)
    mine = cuda_device_uuid()
    here = released or not device or not mine or device == mine
    queued = engine.fast.retry(why) if here else 0
    return {"released": released, "queued": queued}


def preload(engine: Any, settings: Settings, *, shares_card_with_training: bool) -> dict[str, Any]:
    """MEDTUNE_INFER_PRELOAD at worker start: the base, if the card holds it beside a recipe job
    on it (the default spec on that base) when a training worker may share the card."""
    base_model = settings.infer_preload
    if not base_model:
        return {"warmed": False, "why": "no MEDTUNE_INFER_PRELOAD"}
    training = None
    if engine.cuda and shares_card_with_training:
        training = {"gib": _recipe_job_gib(base_model, engine.models_dir)}
    return warm(engine, base_model=base_model, training=training)


def _training_gib(spec: Any, model_path: str, engine: str, tokens: int | None) -> float | None:
    from pathlib import Path

    from core.memory import estimate, find_shape

    shape = find_shape(spec.model.base_model, local_dir=Path(model_path))
    if shape is None:
        return None
    return estimate(spec, shape, engine=engine, tokens=tokens).total_gib


def _recipe_job_gib(base_model: str, models_dir: Any) -> float | None:
    """The memory estimate of the recipe's job on ``base_model`` (None if its shape is unknown)."""
    from pathlib import Path

    from core.base_models import resolve
    from core.memory import estimate, find_shape
    from core.spec import JobSpec

    try:
        path = resolve(base_model, models_dir=models_dir)
        shape = find_shape(base_model, local_dir=Path(path))
        spec = JobSpec.model_validate({"model_config": {"base_model": base_model}})
    except Exception:  # unresolvable here: reserve nothing, the memory check still applies
        return None
    return estimate(spec, shape).total_gib if shape else None
