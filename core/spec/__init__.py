"""The job spec: what POST /jobs accepts, the recipe's config layout validated.

job.py holds the spec and its model, LoRA, training and export sections; evaluation.py the
evaluation section; dataset.py the dataset sections; base.py the section base they share.
"""

from core.spec.dataset import (
    ARCHIVE_SUFFIXES,
    DATA_SUFFIXES,
    FILE_REF,
    RECIPE_SYSTEM_PROMPT,
    SOURCE_FIELDS,
    ColumnMap,
    DatasetSection,
    DatasetSource,
    ValidationDataset,
    looks_like_path,
)
from core.spec.evaluation import DEFAULT_REPETITION_PENALTY, EvaluationSection
from core.spec.job import (
    ALL_PROJECTIONS,
    ExportFormat,
    ExportSection,
    GgufQuantization,
    JobSpec,
    LoraSection,
    ModelSection,
    Optimizer,
    Scheduler,
    TrainingSection,
    check_model_name,
)

__all__ = [
    "ALL_PROJECTIONS",
    "ARCHIVE_SUFFIXES",
    "DATA_SUFFIXES",
    "DEFAULT_REPETITION_PENALTY",
    "FILE_REF",
    "RECIPE_SYSTEM_PROMPT",
    "SOURCE_FIELDS",
    "ColumnMap",
    "DatasetSection",
    "DatasetSource",
    "EvaluationSection",
    "ExportFormat",
    "ExportSection",
    "GgufQuantization",
    "JobSpec",
    "LoraSection",
    "ModelSection",
    "Optimizer",
    "Scheduler",
    "TrainingSection",
    "ValidationDataset",
    "check_model_name",
    "looks_like_path",
]
