"""Training recipes: the numbers a :class:`TrainConfig` gets for every field left at ``None``.

* ``finetune`` (published variants): upstream RF-DETR 1.11.2's recipe (``rfdetr-upstream.md`` 5.1): AdamW,
  lr 1e-4, encoder lr 1.5e-4 with layer decay 0.8, decoder x0.7, weight decay 1e-4, grad-norm clip 0.1, EMA
  0.993 with warm-up tau 100, step schedule without warm-up, effective batch 16 (4 x 4 accumulation, the
  batch upstream's docs recommend), 100 epochs.
* ``scratch`` (``seg-tiny``): a small model trained from random weights on the CPU demo. Higher learning
  rate, no layer decay, short warm-up, cosine schedule, EMA with a short warm-up, looser clipping, and a fixed
  budget of optimiser steps rather than epochs (sized from measured CPU speed; see docs/training.md).
"""

from __future__ import annotations

from rfdetr_core.variants import Variant
from rfdetr_train.engine.config import TrainConfig

FINETUNE = {
    "batch_size": 4,
    "grad_accum": 4,
    "lr": 1e-4,
    "lr_encoder": 1.5e-4,
    "lr_vit_layer_decay": 0.8,
    "lr_component_decay": 0.7,
    "weight_decay": 1e-4,
    "lr_scheduler": "step",
    "warmup_steps": 0,
    "min_lr_factor": 0.0,
    "clip_grad_norm": 0.1,
    "ema": True,
    "ema_decay": 0.993,
    "ema_tau": 100.0,
    "drop_path": 0.0,
    "epochs": 100,
}

SCRATCH = {
    # batch 4: more updates per image seen; a from-scratch DETR is update-bound early on
    "batch_size": 4,
    "grad_accum": 1,
    "lr": 5e-4,
    "lr_encoder": 5e-4,
    "lr_vit_layer_decay": 1.0,
    "lr_component_decay": 1.0,
    "weight_decay": 1e-4,
    "lr_scheduler": "cosine",
    "warmup_steps": 100,
    "min_lr_factor": 0.05,
    "clip_grad_norm": 1.0,
    "ema": True,
    "ema_decay": 0.99,
    "ema_tau": 20.0,
    "drop_path": 0.0,
    # 8000 images: ~400 s at the 20 images/s seg-tiny was sized for on 2 cores (measured only on a shared,
    # 4-5x oversubscribed machine so far: see the training note)
    "steps": 2000,
    "steps_per_validation": 400,
}


def recipe_name(config: TrainConfig, variant: Variant) -> str:
    """``finetune`` or ``scratch``: explicit, else ``scratch`` for variants without pretrained weights."""
    if config.recipe != "auto":
        return config.recipe
    return "scratch" if variant.weights is None and config.weights is None else "finetune"


def resolve(config: TrainConfig, variant: Variant) -> TrainConfig:
    """A copy of ``config`` with every recipe field filled in (explicit values always win)."""
    name = recipe_name(config, variant)
    table = SCRATCH if name == "scratch" else FINETUNE
    updates = {}
    for key, value in table.items():
        if key in ("epochs", "steps"):
            continue
        if getattr(config, key) is None:
            updates[key] = value
    if config.epochs is None and config.steps is None:
        length = "steps" if "steps" in table else "epochs"
        updates[length] = table[length]
    # A user-given --lr scales the encoder rate with it unless that was given too (upstream ratio 1.5).
    if config.lr is not None and config.lr_encoder is None:
        updates["lr_encoder"] = config.lr * table["lr_encoder"] / table["lr"]
    updates["recipe"] = name
    return config.model_copy(update=updates)
