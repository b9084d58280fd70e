"""Data section of the rfdetr-train configuration (filled by the data issue)."""

from __future__ import annotations

from rfdetr_train.config_base import ConfigSection


class DataConfig(ConfigSection):
    """Dataset location, format and augmentation."""
