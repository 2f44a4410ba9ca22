"""The base of every config section: unknown keys are errors, values are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: a typo is an error that names the key, and a resolved config cannot
    change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
