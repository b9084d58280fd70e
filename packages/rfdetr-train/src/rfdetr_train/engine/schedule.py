"""Learning-rate schedules, stepped once per optimiser step.

Linear warm-up to the base rate, then either the upstream "step" schedule (x0.1 from ``lr_drop_steps`` on)
or a half-cosine from the base rate down to ``min_factor`` x base at ``total_steps``. The schedule is a pure
function of the optimiser-step counter, so resuming needs no scheduler state beyond that counter.

Warm-up starts at ``1 / warmup_steps`` of the rate (upstream starts at 0, which wastes the first step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LRSchedule:
    """``factor(step)`` multiplies each group's ``base_lr``; ``step`` counts completed optimiser steps."""

    kind: str  # "step" or "cosine"
    total_steps: int
    warmup_steps: int = 0
    lr_drop_steps: int | None = None  # "step": drop from here on; None = never
    min_factor: float = 0.0  # "cosine": floor

    def __post_init__(self):
        if self.kind not in ("step", "cosine"):
            raise ValueError(f"unknown schedule {self.kind!r}; use 'step' or 'cosine'")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_drop_steps is not None and step >= self.lr_drop_steps:
            return 0.1
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's ``lr`` for the optimiser step about to run (``step`` = steps done); return factor."""
        f = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * f
        return f
