"""Box geometry for the matcher and the box losses: batched pairwise and matched-pair (elementwise) IoU/GIoU.

torchvision's ``generalized_box_iou`` is two-dimensional only and divides without guarding degenerate boxes;
the matcher needs a batch dimension (``[B, Q, T]`` cost matrices over padded targets) and the losses must stay
finite when a predicted box collapses to zero area, so these few lines are our own. GIoU: Rezatofighi et al.,
CVPR 2019 (arXiv 1902.09630).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Guards the two divisions (union, enclosing area) against degenerate boxes only; any non-degenerate pair
# keeps its exact value (identical boxes give IoU == 1 exactly). Same constant upstream RF-DETR uses.
_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> ``[..., 4]`` (x0, y0, x1, y1).

    Negative widths/heights are clamped to 0 first: a raw box head can emit them, and an inverted box would
    give a negative area and a GIoU outside [-1, 1].
    """
    cx, cy, w, h = boxes.unbind(-1)
    half_w = 0.5 * w.clamp(min=0.0)
    half_h = 0.5 * h.clamp(min=0.0)
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of every pair, batched over leading dimensions.

    Args:
        boxes1: ``[..., N, 4]`` xyxy.
        boxes2: ``[..., M, 4]`` xyxy (same leading dimensions).

    Returns:
        ``[..., N, M]`` GIoU in [-1, 1].
    """
    a = boxes1[..., :, None, :]  # [..., N, 1, 4]
    b = boxes2[..., None, :, :]  # [..., 1, M, 4]
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]  # [..., N, M]
    union = _area(boxes1)[..., :, None] + _area(boxes2)[..., None, :] - inter
    iou = inter / union.clamp(min=_EPS)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)


def matched_box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of matched pairs (row i with row i), without the N x N matrix.

    Args:
        boxes1: ``[N, 4]`` xyxy.
        boxes2: ``[N, 4]`` xyxy.

    Returns:
        ``(iou [N], union [N])``.
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"matched boxes need equal shapes, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    inter_wh = (
        torch.minimum(boxes1[:, 2:], boxes2[:, 2:]) - torch.maximum(boxes1[:, :2], boxes2[:, :2])
    ).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = _area(boxes1) + _area(boxes2) - inter
    return inter / union.clamp(min=_EPS), union


def matched_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matched pairs: ``[N, 4]`` xyxy twice -> ``[N]``."""
    iou, union = matched_box_iou(boxes1, boxes2)
    hull_wh = (
        torch.maximum(boxes1[:, 2:], boxes2[:, 2:]) - torch.minimum(boxes1[:, :2], boxes2[:, :2])
    ).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)
