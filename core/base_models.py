"""Find a base model: the embedded default, a local folder, or a Hugging Face Hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.embedded_model import is_embedded, prepare_embedded_model
from core.errors import HubUnavailable, ModelNotAvailable
from core.spec import looks_like_path


def check_base_model(name: str) -> None:
    """Cheap check at submit time: local folders must exist (Hub ids are checked by the worker)."""
    if is_embedded(name):
        return
    if looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ModelNotAvailable(
            f"base model folder {name!r} does not exist on the server; give a Hub id, a folder "
            "the worker can read, or 'smollm2-135m-instruct'",
            field="model_config.base_model",
        )


def resolve(name: str, *, models_dir: Path) -> str:
    """A path or Hub id that ``from_pretrained`` can load."""
    if is_embedded(name):
        return str(prepare_embedded_model(models_dir))
    check_base_model(name)
    local = Path(name).expanduser()
    return str(local) if local.is_dir() else name


def hub_call(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a ``from_pretrained``-style call, turning Hub failures into one clear error."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise HubUnavailable(
            f"could not load {name!r} from the Hugging Face Hub"
            + (" (HF_HUB_OFFLINE=1)" if offline else "")
            + f": {str(exc).splitlines()[0][:300]}. Use a local folder or 'smollm2-135m-instruct'",
            field="model_config.base_model",
        ) from exc
