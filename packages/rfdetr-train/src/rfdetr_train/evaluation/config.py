"""Evaluation section of the rfdetr-train configuration (filled by the evaluation issue)."""

from __future__ import annotations

from rfdetr_train.config_base import ConfigSection


class EvalConfig(ConfigSection):
    """Evaluation settings and report writers."""
