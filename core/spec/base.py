"""The base of every job-spec section, and the strict number types its fields use."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Strict

# A number is a JSON number: pydantic's lax mode would take true as 1 and "5" as 5. Strict
# floats still take an int (2 where 2.0 is meant), never a bool or a string.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
