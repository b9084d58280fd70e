"""Early stopping on a validation metric (higher is better), and tracking of the best value."""

from __future__ import annotations

import math


class EarlyStopping:
    """Stop after ``patience`` validations without an improvement larger than ``min_delta``.

    With ``patience=None`` it never stops but still tracks the best value (used to decide ``best.safetensors``).
    """

    def __init__(self, patience: int | None = None, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_validations = 0

    def update(self, value: float, step: int) -> bool:
        """Record a validation result; returns ``True`` if it is a new best."""
        if value is None or not math.isfinite(value):
            self.bad_validations += 1
            return False
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_step, self.bad_validations = float(value), int(step), 0
            return True
        self.bad_validations += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_validations >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.bad_validations = int(state.get("bad_validations", 0))
