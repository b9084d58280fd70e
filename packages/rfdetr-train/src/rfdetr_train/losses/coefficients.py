"""The criterion's coefficients, written once: loss weights and matching costs, defaults = upstream RF-DETR 1.11.2.

Upstream's values (``rfdetr-upstream.md`` section 3): losses class 1, box L1 5, GIoU 2, mask BCE 5, mask Dice 5;
matching costs class 2, box L1 5, GIoU 2, mask BCE 5, mask Dice 5. A recipe that wants other numbers
overrides fields of these defaults, e.g. ``dataclasses.replace(LossWeights(), ce=4.0)``
(:mod:`rfdetr_train.engine.recipes`).
"""

from __future__ import annotations

from dataclasses import dataclass

# The five losses of one output layer; earlier layers add ``_0`` ... and the two-stage output ``_enc``.
LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce", "loss_mask_dice")
MASK_LOSS_NAMES = ("loss_mask_ce", "loss_mask_dice")


@dataclass(frozen=True)
class LossWeights:
    """Weight of each loss in the total; field ``x`` weighs ``loss_x`` of :data:`LOSS_NAMES`.

    Attributes:
        ce: the IoU-aware BCE class loss.
        bbox: L1 of normalised cxcywh boxes.
        giou: ``1 - GIoU`` of the boxes.
        mask_ce: point-sampled mask BCE.
        mask_dice: point-sampled mask Dice.
    """

    ce: float = 1.0
    bbox: float = 5.0
    giou: float = 2.0
    mask_ce: float = 5.0
    mask_dice: float = 5.0

    def by_loss(self, segmentation: bool = True) -> dict[str, float]:
        """``{loss name: weight}`` in :data:`LOSS_NAMES` order; without the mask losses for detection."""
        names = LOSS_NAMES if segmentation else tuple(n for n in LOSS_NAMES if n not in MASK_LOSS_NAMES)
        return {name: float(getattr(self, name.removeprefix("loss_"))) for name in names}


@dataclass(frozen=True)
class MatchCosts:
    """Weight of each term of the Hungarian matching cost.

    Attributes:
        cls: the focal class cost.
        bbox: L1 distance of cxcywh boxes.
        giou: ``-GIoU``.
        mask_ce, mask_dice: point-sampled mask BCE and Dice (used only when the outputs carry masks).
    """

    cls: float = 2.0
    bbox: float = 5.0
    giou: float = 2.0
    mask_ce: float = 5.0
    mask_dice: float = 5.0

    def __post_init__(self) -> None:
        if self.cls == 0 and self.bbox == 0 and self.giou == 0:
            raise ValueError("the class, box and GIoU matching costs cannot all be 0")

    @property
    def uses_masks(self) -> bool:
        return bool(self.mask_ce or self.mask_dice)
