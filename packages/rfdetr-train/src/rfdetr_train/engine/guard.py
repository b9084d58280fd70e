"""Skip optimiser steps whose loss or gradients are not finite, and stop after too many in a row.

A single NaN/inf (an fp16 overflow, a degenerate box) should cost one step, not the run; a run that keeps
producing them has diverged and must stop with a message saying what to change.
"""

from __future__ import annotations

from rfdetr_core.errors import RFDETRError


class TrainingDivergedError(RFDETRError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps.

    Args:
        max_consecutive: stop (raise :class:`TrainingDivergedError`) when this many steps in a row are bad.
    """

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.consecutive = 0

    def record(self, finite: bool, step: int, what: str = "loss") -> bool:
        """Record one step; returns ``True`` when the step may be applied, ``False`` when it must be skipped."""
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingDivergedError(
                f"Training diverged: {self.consecutive} optimiser steps in a row up to step {step} had a "
                f"non-finite {what} ({self.skipped} skipped in total). Lower the learning rate (--lr), keep "
                "gradient clipping on, or train in fp32/bf16 instead of fp16; the last good checkpoint is in "
                "checkpoints/last/."
            )
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
