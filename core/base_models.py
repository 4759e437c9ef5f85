"""Find a base model: the embedded default, a local folder, or a Hugging Face Hub id."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.embedded_model import is_embedded, prepare_embedded_model
from core.errors import ModelNotAvailable, SpecError
from core.hub_errors import hub_error
from core.paths import is_inside, link_leads_out, real_path
from core.settings import Settings, get_settings
from core.spec import looks_like_path

FIELD = "model_config.base_model"


class ModelPathNotAllowed(SpecError):
    code = "model_path_not_allowed"


def allowed_model_roots(settings: Settings | None = None) -> list[Path]:
    """Folders a local base model may lie in: the model cache and MEDTUNE_MODEL_ROOTS."""
    settings = settings or get_settings()
    return [p.expanduser().resolve() for p in (settings.models_dir, *settings.model_roots)]


def _is_local(name: str) -> bool:
    # from_pretrained loads a Hub-shaped name like 'org/model' from disk when that folder exists
    # (relative to the worker's working directory), so such a name is a local path too.
    if looks_like_path(name):
        return True
    try:
        return Path(name).exists()
    except (OSError, ValueError):
        return False


def confined_model_dir(
    name: str, *, roots: Sequence[Path] | None = None, field: str = FIELD
) -> Path | None:
    """The real folder of a local base model, confined to ``roots``; None for the embedded model
    and Hub ids.

    A local folder must lead inside ``roots`` (default: :func:`allowed_model_roots` of the
    settings) once ``~``, ``..`` and links are resolved, and must hold no link leading outside
    them. The API checks at submit time and the worker again before it loads.
    """
    if is_embedded(name) or not _is_local(name):
        return None
    roots = allowed_model_roots() if roots is None else roots
    real = real_path(Path(name))
    # Where the path leads is checked before whether it exists, so that a path outside the
    # roots tells nothing of what exists there. The message names only what the client sent.
    if real is not None and not is_inside(real, roots):
        raise _not_allowed(name, "is outside the folders models may come from", field)
    if real is None or not real.is_dir():
        raise ModelNotAvailable(
            f"base model folder {name!r} does not exist on the server; give a Hub id, a folder "
            "the worker can read, or 'smollm2-135m-instruct'",
            field=field,
        )
    if link_leads_out(real, roots):
        raise _not_allowed(name, "holds a link leading outside those folders", field)
    return real


def _not_allowed(name: str, what: str, field: str) -> ModelPathNotAllowed:
    return ModelPathNotAllowed(
        f"base model path {name!r} {what}; this server loads local models only from its model "
        "cache and the folders in MEDTUNE_MODEL_ROOTS: copy the model there, or ask the "
        "operator to add its folder",
        field=field,
    )


def check_base_model(name: str, *, roots: Sequence[Path] | None = None, field: str = FIELD) -> None:
    """Cheap check at submit time: local folders must exist inside the model roots (Hub ids are
    checked by the worker)."""
    confined_model_dir(name, roots=roots, field=field)


def resolve(name: str, *, models_dir: Path, roots: Sequence[Path] | None = None) -> str:
    """A path or Hub id that ``from_pretrained`` can load (a local folder checked again here,
    with the worker's own settings)."""
    if is_embedded(name):
        return str(prepare_embedded_model(models_dir))
    local = confined_model_dir(name, roots=roots)
    return str(local) if local is not None else name


def hub_call(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a ``from_pretrained``-style call, turning Hub failures into errors with a code per
    cause (core.hub_errors)."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        error = hub_error(
            exc,
            what="model",
            name=name,
            revision=kwargs.get("revision"),
            field=FIELD,
            revision_field="model_config.revision",
            instead="use a local folder or 'smollm2-135m-instruct'",
        )
        if os.environ.get("HF_HUB_OFFLINE") == "1" and "HF_HUB_OFFLINE" not in error.detail:
            error.detail += " (HF_HUB_OFFLINE=1)"
            error.args = (error.detail,)
        raise error from exc
