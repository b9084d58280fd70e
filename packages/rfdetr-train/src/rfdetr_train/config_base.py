"""Base class of every rfdetr-train configuration section: unknown keys are errors naming the key."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
