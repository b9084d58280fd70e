"""The loss formulas shared by the per-layer and the layer-batched criterion passes.

Both passes call these on tensors of any leading shape, so each formula is written once; the passes differ only
in how many layers one call covers and in how the per-element terms are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_train.losses.box_ops import matched_box_iou


def ia_bce_terms(
    logits: Tensor,
    cells: tuple[Tensor, ...],
    src_xyxy: Tensor,
    tgt_xyxy: Tensor,
    alpha: float,
    gamma: float,
) -> Tensor:
    """IoU-aware BCE per (query, class) cell, not summed: -> the shape of ``logits``.

    At a matched cell the target score is ``t = clamp(p^alpha * IoU^(1-alpha), 0.01)`` (detached), with
    weights ``t`` on ``-log p`` and ``1 - t`` on ``-log(1-p)``; every other cell is a negative weighted by
    ``p^gamma`` (not detached, as upstream).

    Args:
        logits: ``[..., K]`` float32 class logits (e.g. ``[B, GQ, K]`` or ``[L, B, GQ, K]``).
        cells: one ``[M]`` int64 index tensor per dimension of ``logits`` (the last one holds the labels).
        src_xyxy: ``[M, 4]`` detached predicted boxes of the matched pairs; tgt_xyxy: ``[M, 4]`` targets.
    """
    prob = logits.sigmoid()
    iou = matched_box_iou(src_xyxy, tgt_xyxy)[0]  # [M], boxes already detached
    t = (prob[cells].pow(alpha) * iou.pow(1 - alpha)).clamp(min=0.01).detach()
    pos_weight = torch.zeros_like(logits).index_put(cells, t)
    neg_weight = prob.pow(gamma).index_put(cells, 1 - t)
    # -w+ log p - w- log(1-p) with log(1-p) = log p - x, written with the stable logsigmoid.
    return neg_weight * logits - F.logsigmoid(logits) * (pos_weight + neg_weight)


def point_mask_terms(point_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean point BCE and Dice loss per mask: ``[M, P]`` logits and {0, 1} labels -> two ``[M]``."""
    bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none").mean(1)  # [M]
    prob = point_logits.sigmoid()
    dice = 1 - (2 * (prob * labels).sum(-1) + 1) / (prob.sum(-1) + labels.sum(-1) + 1)  # [M]
    return bce, dice
