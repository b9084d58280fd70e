"""Training section of the rfdetr-train configuration (filled by the training issue)."""

from __future__ import annotations

from rfdetr_train.config_base import ConfigSection


class TrainConfig(ConfigSection):
    """Model, optimisation, engine and run-directory settings."""
