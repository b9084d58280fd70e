"""The typed configuration schema of rfdetr-train.

CLI flags, YAML files (``--config FILE.yaml``) and the Python API (``rfdetr_train.train(...)``) all map onto
these pydantic models. Unknown keys are errors that name the key. Each section is filled by the issue that
owns it: :class:`DataConfig` (datasets and augmentation), :class:`EvalConfig` (evaluation and reports),
:class:`TrainConfig` (optimisation, engine and run directory).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Dataset location, format and augmentation (filled by the data issue)."""


class EvalConfig(_Section):
    """Evaluation settings and report writers (filled by the evaluation issue)."""


class TrainConfig(_Section):
    """Model, optimisation, engine and run-directory settings (filled by the training issue)."""


class RunConfig(_Section):
    """Everything one training or validation run needs."""

    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainConfig = TrainConfig()
