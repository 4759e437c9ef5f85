"""Preference tuning in the job spec: ``training_config.method`` and ``training_config.preference``.

``sft`` (the default) trains on answers; ``dpo`` and ``orpo`` train on pairs of a chosen and a
rejected answer to the same prompt. The checks here run inside JobSpec validation, so a spec
that mixes the two (a DPO knob on an SFT job, packing on a DPO job) is a 422 before it is stored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from core.spec.base import Float, Int
from core.spec.base import Section as _Section

Method = Literal["sft", "dpo", "orpo"]
PREFERENCE_METHODS = ("dpo", "orpo")
# TRL's DPO losses that need no knob beyond beta (exo_pair needs label smoothing; aot sorts a
# batch, so it is unpaired): sigmoid is DPO itself, ipo IPO, hinge SLiC, robust rDPO.
DpoLoss = Literal[
    "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"
]
# The error type (and problem code) of a setting that does not fit the job's method.
METHOD_CONFLICT = "method_conflict"

METHOD_HELP = (
    "sft: supervised fine-tuning on answers (the default). dpo: Direct Preference Optimization "
    "on rows with a prompt (or messages), a chosen and a rejected answer, against a frozen "
    "reference (the base, or model_config.init_adapter's adapter: no second model in memory). "
    "orpo: odds-ratio preference optimization on the same rows, no reference."
)
PREFERENCE_HELP = (
    "The dpo / orpo knobs (beta, loss_type, max_prompt_length, max_completion_length); null "
    "takes the defaults. Only for method 'dpo' or 'orpo'."
)


class PreferenceSection(_Section):
    beta: Float = Field(
        default=0.1,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="dpo: how far the tuned model may move from the reference (higher: less; "
        "for loss_type 'ipo' the regulariser tau). orpo: the weight of the odds-ratio term "
        "beside the answer's NLL (the paper's lambda).",
    )
    loss_type: DpoLoss | None = Field(
        default=None,
        description="dpo only: TRL's DPO loss ('sigmoid': DPO, 'ipo', 'hinge', 'robust', ...); "
        "null: 'sigmoid'.",
    )
    max_prompt_length: Int | None = Field(
        default=None,
        ge=1,
        le=131072,
        description="Tokens of the prompt kept (its start is cut first, so the question stays); "
        "null: half of model_config.max_seq_length.",
    )
    max_completion_length: Int | None = Field(
        default=None,
        ge=1,
        le=131072,
        description="Tokens of each answer kept (chosen and rejected alike); null: "
        "model_config.max_seq_length minus max_prompt_length.",
    )


def lengths(section: PreferenceSection | None, max_seq_length: int) -> tuple[int, int]:
    """(prompt, completion) token budgets of a preference job."""
    section = section or PreferenceSection()
    prompt = section.max_prompt_length or max(1, max_seq_length // 2)
    completion = section.max_completion_length or max(1, max_seq_length - prompt)
    return prompt, completion


def _conflict(message: str) -> PydanticCustomError:
    return PydanticCustomError(METHOD_CONFLICT, message)


def check_preference(value: PreferenceSection | None, info: ValidationInfo) -> Any:
    """TrainingSection.preference against TrainingSection.method (declared before it)."""
    method = info.data.get("method", "sft")
    if value is None:
        return value
    if method not in PREFERENCE_METHODS:
        raise _conflict(
            f"training_config.preference applies to method 'dpo' or 'orpo', and method is "
            f"{method!r}: set training_config.method to 'dpo' or 'orpo', or remove preference"
        )
    if method == "orpo" and value.loss_type is not None:
        raise _conflict(
            "training_config.preference.loss_type chooses a DPO loss, and ORPO has one loss of "
            "its own: remove loss_type, or set training_config.method to 'dpo'"
        )
    return value


def check_method(training: Any, info: ValidationInfo) -> Any:
    """A preference job's other sections: what DPO and ORPO cannot do (JobSpec, on training)."""
    if training.method not in PREFERENCE_METHODS:
        return training
    method = training.method
    if training.packing:
        raise _conflict(
            f"training_config.packing is for sft jobs; a {method} job batches its prompt, chosen "
            "and rejected answers together: set packing to false"
        )
    dataset = info.data.get("dataset")
    if dataset is not None and dataset.sources is not None:
        raise _conflict(
            f"training_dataset.sources (a mix) is for sft jobs; a {method} job reads one "
            "preference dataset: give it as training_dataset.name"
        )
    for section in ("training_dataset", "validation_dataset"):
        data = dataset if section == "training_dataset" else info.data.get(section)
        if data is not None and data.format == "text":
            raise _conflict(
                f'{section}.format "text" is raw documents for continued pretraining (sft); a '
                f"{method} job reads prompt (or messages), chosen and rejected: set format to "
                '"auto" or "records"'
            )
    if dataset is not None and dataset.columns is not None:
        raise _conflict(
            "training_dataset.columns maps question/answer columns; a preference dataset needs "
            "prompt (or messages), chosen and rejected: name them with "
            "training_dataset.rename_columns instead"
        )
    held_out = info.data.get("validation_dataset")
    if held_out is not None and held_out.columns is not None:
        raise _conflict(
            "validation_dataset.columns maps question/answer columns; a preference dataset "
            "needs prompt (or messages), chosen and rejected: use rename_columns instead"
        )
    model = info.data.get("model")
    if model is not None:
        prompt, completion = lengths(training.preference, model.max_seq_length)
        if prompt + completion > model.max_seq_length:
            raise _conflict(
                f"training_config.preference.max_prompt_length ({prompt}) plus "
                f"max_completion_length ({completion}) is above model_config.max_seq_length "
                f"({model.max_seq_length}): lower them, or raise max_seq_length"
            )
    return training


class PreferenceFields(_Section):
    """The method fields TrainingSection starts with (declared first, so its own validators
    see them)."""

    method: Method = Field(default="sft", description=METHOD_HELP)
    preference: PreferenceSection | None = Field(default=None, description=PREFERENCE_HELP)

    @field_validator("preference")
    @classmethod
    def _fits_the_method(
        cls, value: PreferenceSection | None, info: ValidationInfo
    ) -> PreferenceSection | None:
        return check_preference(value, info)
