"""OpenAI's fine-tuning hyperparameters and ``method`` object, as POST /v1/fine_tuning/jobs takes
them: ``{"type": "supervised" | "dpo", "<type>": {"hyperparameters": {...}}}``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError


def auto_or_number(*, integer: bool, gt: int, le: int) -> Any:
    """ "auto" or a number in (gt, le]: one error naming the field, not one per union member."""
    kind = "an integer" if integer else "a number"

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        ok = isinstance(value, int) or (not integer and isinstance(value, float))
        if isinstance(value, bool) or not ok:
            raise PydanticCustomError(
                "auto_or_number", 'Input should be "auto" or {kind}', {"kind": kind}
            )
        if value <= gt:
            raise PydanticCustomError(
                "greater_than", "Input should be greater than {gt}", {"gt": gt}
            )
        if value > le:
            raise PydanticCustomError(
                "less_than_equal", "Input should be less than or equal to {le}", {"le": le}
            )
        return value

    number = {"type": "integer" if integer else "number", "exclusiveMinimum": gt, "maximum": le}
    return Annotated[
        Any,  # "auto" | int | float: the validator above is the type
        PlainValidator(check),
        WithJsonSchema({"anyOf": [{"const": "auto"}, number], "default": "auto"}),
    ]


class FineTuningHyperparameters(BaseModel):
    """OpenAI's hyperparameters; "auto" keeps medtune's recipe values."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: auto_or_number(integer=True, gt=0, le=1000) = "auto"  # type: ignore[valid-type]
    batch_size: auto_or_number(integer=True, gt=0, le=4096) = Field(  # type: ignore[valid-type]
        default="auto",
        description="Examples per optimizer step (micro-batch x gradient accumulation).",
    )
    learning_rate_multiplier: auto_or_number(  # type: ignore[valid-type]
        integer=False, gt=0, le=5000
    ) = Field(default="auto", description="learning_rate = 2e-4 x this.")


class DpoHyperparameters(FineTuningHyperparameters):
    """OpenAI's dpo hyperparameters: the supervised ones plus beta."""

    beta: auto_or_number(integer=False, gt=0, le=100) = Field(  # type: ignore[valid-type]
        default="auto", description="training_config.preference.beta; auto: 0.1."
    )


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: FineTuningHyperparameters = Field(default_factory=FineTuningHyperparameters)


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class FineTuningMethod(BaseModel):
    """supervised: training_config.method 'sft'; dpo: 'dpo' on preference pairs."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> FineTuningMethod:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(
                f"method.{other} is given and method.type is {self.type!r}: give the "
                f"hyperparameters under method.{self.type}, or set type to {other!r}"
            )
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """This method's hyperparameters ("auto" where not given)."""
        section = self.dpo if self.type == "dpo" else self.supervised
        if section is None:
            return (
                DpoHyperparameters() if self.type == "dpo" else FineTuningHyperparameters()
            ).model_dump()
        return section.hyperparameters.model_dump()
