"""A job's separate validation set (``validation_dataset``) as a dataset section of its own.

The validation set is read like one training source and prepared with the training section's
settings, so it is the training section with its source fields replaced. Errors raised while
reading it name ``validation_dataset.<field>`` instead of ``training_dataset.<field>``.

No tokenizer and no torch here: the API checks the validation set's path at submit time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from core.data.sources import FIELD as TRAINING_FIELD
from core.data.sources import resolve_local
from core.errors import MedtuneError
from core.spec import SOURCE_FIELDS, DatasetSection, JobSpec, ValidationDataset

FIELD = "validation_dataset"


def validation_section(training: DatasetSection, validation: ValidationDataset) -> DatasetSection:
    """The training section with the validation set's source fields: one source, no split."""
    update = {name: getattr(validation, name) for name in SOURCE_FIELDS}
    return training.model_copy(
        update={
            **update,
            "sources": None,
            "mix_size": None,
            "mix_oversample": False,
            "validation_share": 0.0,
        }
    )


def rename_field(field: str | None) -> str | None:
    """training_dataset.<source field>... -> validation_dataset.<source field>...; the shared
    settings (chat_template, model_config.max_seq_length) keep their names."""
    if field == TRAINING_FIELD:
        return FIELD
    prefix = f"{TRAINING_FIELD}."
    if field and field.startswith(prefix):
        rest = field.removeprefix(prefix)
        if re.split(r"[.\[]", rest, maxsplit=1)[0] in SOURCE_FIELDS:
            return f"{FIELD}.{rest}"
    return field


@contextmanager
def scoped() -> Iterator[None]:
    """Name the validation set in errors raised while reading or preparing it."""
    try:
        yield
    except MedtuneError as exc:
        renamed = rename_field(exc.field)
        if exc.field and renamed and renamed != exc.field:  # a message may name its field
            exc.detail = exc.detail.replace(exc.field, renamed)
        exc.field = renamed
        if not exc.detail.startswith(FIELD):
            exc.detail = f"{FIELD}: {exc.detail}"
        exc.args = (exc.detail,)
        raise


def resolve_validation(
    spec: JobSpec, *, roots: Sequence[Path] | None = None, uploads: Path | None = None
) -> Path | None:
    """The validation set's file or folder, checked as training sources are (see
    core.data.sources.resolve_local); None for a Hub dataset or a job without one."""
    if spec.validation_dataset is None:
        return None
    with scoped():
        return resolve_local(
            validation_section(spec.dataset, spec.validation_dataset), roots=roots, uploads=uploads
        )
