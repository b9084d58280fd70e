"""Exponential moving average of the model weights.

Upstream RF-DETR's recipe (``rfdetr-upstream.md`` 5.1): after every optimiser step,
``ema = d * ema + (1 - d) * model`` with a warmed-up decay ``d = decay * (1 - exp(-updates / tau))``
(decay 0.993, tau 100), so early on the average follows the fast-moving weights closely. Floating buffers
are averaged like parameters; integer buffers (counters) are copied. The update is two multi-tensor
``torch._foreach_*`` calls, not a Python loop of small kernels, and the tensor lists they take are built once
per model (two ``state_dict()`` walks of a few hundred modules took milliseconds of host time per step).
"""

from __future__ import annotations

import copy
import math
import weakref

import torch
from torch import nn


class ModelEMA:
    """An averaged copy of a model.

    Args:
        model: the model being trained (unwrapped, not DDP). Its copy lives on the same device.
        decay: asymptotic decay.
        tau: warm-up of the decay, in updates (0 = constant decay).
    """

    def __init__(self, model: nn.Module, decay: float = 0.993, tau: float = 100.0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs_of: tuple[weakref.ref, tuple[list, list, list, list]] | None = None

    def current_decay(self) -> float:
        """The decay the next update uses (upstream counts that update as number ``updates + 1``)."""
        if self.tau <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.tau))

    def _pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """``(averaged EMA tensors, their model tensors, copied EMA tensors, their model tensors)``.

        Parameters and buffers are updated in place by the optimiser and the modules, so the lists stay valid
        for the same model and are reused; they are rebuilt for another model object, and never kept when a
        model tensor had to be cast to the EMA's dtype (the cast is a copy that would go stale).
        """
        if self._pairs_of is not None and self._pairs_of[0]() is model:
            return self._pairs_of[1]
        pairs, cast = self._build_pairs(model)
        self._pairs_of = None if cast else (weakref.ref(model), pairs)
        return pairs

    def _build_pairs(self, model: nn.Module) -> tuple[tuple[list, list, list, list], bool]:
        ema_sd = self.module.state_dict(keep_vars=True)
        src_sd = model.state_dict(keep_vars=True)
        if ema_sd.keys() != src_sd.keys():
            missing = sorted(set(src_sd) ^ set(ema_sd))[:5]
            raise RuntimeError(f"EMA and model state dicts differ (e.g. {missing}).")
        avg_e, avg_m, cp_e, cp_m = [], [], [], []
        cast = False
        seen: set[int] = set()
        for key, e in ema_sd.items():
            # A module registered under two names (tied weights) must be blended once, not twice.
            if id(e) in seen:
                continue
            seen.add(id(e))
            m = src_sd[key].detach()
            if e.dtype.is_floating_point:
                avg_e.append(e.data if isinstance(e, nn.Parameter) else e)
                avg_m.append(m.to(e.dtype))
                cast = cast or m.dtype != e.dtype
            else:
                cp_e.append(e)
                cp_m.append(m)
        return (avg_e, avg_m, cp_e, cp_m), cast

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Blend ``model`` into the average; returns the decay used."""
        d = self.current_decay()
        avg_e, avg_m, cp_e, cp_m = self._pairs(model)
        if avg_e:
            # ema += (1 - d) * (model - ema)  ==  d * ema + (1 - d) * model
            torch._foreach_lerp_(avg_e, avg_m, 1.0 - d)
        for e, m in zip(cp_e, cp_m):
            e.copy_(m)
        self.updates += 1
        return d

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Make the average an exact copy of ``model`` (does not count as an update)."""
        avg_e, avg_m, cp_e, cp_m = self._pairs(model)
        for e, m in zip(avg_e + cp_e, avg_m + cp_m):
            e.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state_dict)
        self.updates = int(updates)
