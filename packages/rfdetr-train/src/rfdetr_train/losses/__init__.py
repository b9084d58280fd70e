"""Losses and Hungarian matching of rfdetr-train.

``build_criterion(num_classes, group_detr)`` gives a :class:`SetCriterion`; ``criterion(outputs, targets)``
returns the unweighted losses of every layer and ``criterion.total_loss(losses)`` their weighted sum.
"""

from rfdetr_train.losses.coefficients import LOSS_NAMES, LossWeights, MatchCosts
from rfdetr_train.losses.criterion import SetCriterion, build_criterion
from rfdetr_train.losses.matcher import HungarianMatcher
from rfdetr_train.losses.point_sampling import ImportancePointSampler, UniformPointSampler
from rfdetr_train.losses.targets import LayerMatches, TargetBatch, TargetFormatError

__all__ = [
    "LOSS_NAMES",
    "HungarianMatcher",
    "ImportancePointSampler",
    "LayerMatches",
    "LossWeights",
    "MatchCosts",
    "SetCriterion",
    "TargetBatch",
    "TargetFormatError",
    "UniformPointSampler",
    "build_criterion",
]
