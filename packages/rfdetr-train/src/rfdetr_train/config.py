"""The typed configuration schema of rfdetr-train.

CLI flags, YAML files (``--config FILE.yaml``) and the Python API (``rfdetr_train.train(...)``) all map onto
these pydantic models; unknown keys are errors that name the key. Each section lives beside the code it
configures: :class:`~rfdetr_train.data.config.DataConfig`, :class:`~rfdetr_train.evaluation.config.EvalConfig`
and :class:`~rfdetr_train.engine.config.TrainConfig`.
"""

from __future__ import annotations

from rfdetr_train.config_base import ConfigSection
from rfdetr_train.data.config import DataConfig
from rfdetr_train.engine.config import TrainConfig
from rfdetr_train.evaluation.config import EvalConfig


class RunConfig(ConfigSection):
    """Everything one training or validation run needs."""

    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainConfig = TrainConfig()


__all__ = ["DataConfig", "EvalConfig", "RunConfig", "TrainConfig"]
