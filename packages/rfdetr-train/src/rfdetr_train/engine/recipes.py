"""Training recipes: the numbers a :class:`TrainConfig` gets for every field left at ``None``.

* ``finetune`` (published variants): upstream RF-DETR 1.11.2's recipe (``rfdetr-upstream.md`` 5.1): AdamW,
  lr 1e-4, encoder lr 1.5e-4 with layer decay 0.8, decoder x0.7, weight decay 1e-4, grad-norm clip 0.1, EMA
  0.993 with warm-up tau 100, step schedule without warm-up, effective batch 16 (4 x 4 accumulation, the
  batch upstream's docs recommend), 100 epochs.
* ``scratch`` (``seg-tiny``, ``--weights none``): a model trained from random weights (the CPU demo). Higher learning
  rate, no layer decay, short warm-up, cosine schedule, EMA with a short warm-up, looser clipping, and a fixed
  budget of optimiser steps rather than epochs (sized from measured CPU speed; see docs/training.md); one
  input size instead of multi-scale (:data:`SCRATCH_DATA`), and loss weights and a matcher of its own
  (:data:`SCRATCH_LOSS_WEIGHTS`, :data:`SCRATCH_MATCH_COSTS`: overrides of upstream's defaults; classes
  weighted up, masks down, no mask costs in the matching).
"""

from __future__ import annotations

from dataclasses import replace

from rfdetr_core.variants import Variant
from rfdetr_train.data.config import DataConfig
from rfdetr_train.engine.config import TrainConfig
from rfdetr_train.losses.coefficients import LossWeights, MatchCosts

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
    # batch 4: batch 2 gives 1.5x the steps per second on 2 cores but learns less per image (CPU demo: segm
    # AP50 0.021 after 330 s at batch 2 vs 0.138 at batch 4; docs/training.md)
    "batch_size": 4,
    "grad_accum": 1,
    # lr 2.5e-4 rather than 5e-4: with the loss weights of SCRATCH_LOSS_WEIGHTS it takes off ~800 steps sooner
    # (scratch-recipe sweep, docs/training.md)
    "lr": 2.5e-4,
    "lr_encoder": 2.5e-4,
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
    # 13600 images: ~560 s at the ~24 images/s of the idle 2-core machine (2 compute threads, loading in the
    # main process, one input size), so the CPU demo ends within 600 s; see docs/training.md
    "steps": 3400,
    "steps_per_validation": 400,
}

# Criterion settings of the scratch recipe, as overrides of upstream's defaults (finetune keeps those).
# * Loss weights: class 4 (upstream 1), box L1 5 and GIoU 2 (as upstream), mask BCE 2 and Dice 2 (upstream 5 and
#   5). From random weights the masks are noise and the upstream weights let the mask losses dominate the
#   gradient; weighting the class term up makes the model find the objects ~1000 steps sooner. Sweep of the
#   CPU demo's 3400 steps, mean segm AP50 on the synthetic val split over seeds (docs/training.md): upstream
#   weights + lr 5e-4 0.26, masks 2/2 + lr 2.5e-4 0.28, + class 2 0.33, + class 3 0.34, + class 4 0.39,
#   + class 6 0.36, + class 8 0.38.
# * The matcher ignores the mask costs: masks of an untrained model are noise, and with them in the cost the
#   assignment of queries to objects keeps changing; boxes and classes alone give a steadier matching (segm
#   AP50 0.046 vs 0.027 after 2000 steps of the earlier recipe; docs/training.md).
SCRATCH_LOSS_WEIGHTS = replace(LossWeights(), ce=4.0, mask_ce=2.0, mask_dice=2.0)
SCRATCH_MATCH_COSTS = replace(MatchCosts(), mask_ce=0.0, mask_dice=0.0)


def criterion_options(config: TrainConfig) -> dict:
    """Keyword arguments (``weights``, ``costs``, ``compile_losses``) for ``build_criterion`` of a resolved
    config: upstream's weights and costs for ``finetune``."""
    compiled = {"compile_losses": config.compile_criterion}
    if config.recipe == "scratch":
        return {"weights": SCRATCH_LOSS_WEIGHTS, "costs": SCRATCH_MATCH_COSTS, **compiled}
    return {"weights": LossWeights(), "costs": MatchCosts(), **compiled}


# Data settings of the scratch recipe, used where the run does not set them: one input size (the validation
# size) instead of upstream's multi-scale set; the small sizes (down to 80 px) shrink objects below one patch.
SCRATCH_DATA = {"multi_scale": False}


def resolve_data(data: DataConfig, recipe: str) -> DataConfig:
    """``data`` with the recipe's data settings filled in where the run did not set them explicitly."""
    table = SCRATCH_DATA if recipe == "scratch" else {}
    updates = {k: v for k, v in table.items() if k not in data.model_fields_set}
    return data.model_copy(update=updates) if updates else data


def recipe_name(config: TrainConfig, variant: Variant) -> str:
    """``finetune`` or ``scratch``: explicit, else ``finetune`` for a run that starts from weights and
    ``scratch`` for one from random weights (seg-tiny, ``--weights none``); ``config.weights`` is already
    resolved (:mod:`rfdetr_train.engine.starting_point`)."""
    if config.recipe != "auto":
        return config.recipe
    return "scratch" if config.weights is None else "finetune"


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
        if config.test_limit is not None:
            # A quick look (--test-limit without a length): train up to the first validation, then stop.
            first = config.steps_per_validation or table.get("steps_per_validation")
            updates.update({"steps": first} if first else {"epochs": 1})
        else:
            length = "steps" if "steps" in table else "epochs"
            updates[length] = table[length]
    steps = updates.get("steps", config.steps)
    if config.warmup_steps is None and steps is not None and "steps" in table and steps < table["steps"]:
        # a shorter run than the recipe's keeps the recipe's share of warm-up (a 60-step run must not end
        # still warming up)
        updates["warmup_steps"] = round(table["warmup_steps"] * steps / table["steps"])
    # A user-given --lr scales the encoder rate with it unless that was given too (upstream ratio 1.5).
    if config.lr is not None and config.lr_encoder is None:
        updates["lr_encoder"] = config.lr * table["lr_encoder"] / table["lr"]
    updates["recipe"] = name
    return config.model_copy(update=updates)
