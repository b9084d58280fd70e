"""The loss formulas shared by the per-layer and the layer-batched criterion passes.

Both passes call these on tensors of any leading shape, so each formula is written once; the passes differ only
in how many layers one call covers and in how the per-element terms are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rfdetr_train.losses.box_ops import matched_box_iou


def ia_bce_terms(
    logits: Tensor,
    cells: tuple[Tensor, ...],
    src_xyxy: Tensor,
    tgt_xyxy: Tensor,
    alpha: float,
    gamma: float,
    *,
    recompute: bool = False,
) -> Tensor:
    """IoU-aware BCE per (query, class) cell, not summed: -> the shape of ``logits``.

    At a matched cell the target score is ``t = clamp(p^alpha * IoU^(1-alpha), 0.01)`` (detached), with
    weights ``t`` on ``-log p`` and ``1 - t`` on ``-log(1-p)``; every other cell is a negative weighted by
    ``p^gamma`` (not detached, as upstream).

    Args:
        logits: ``[..., K]`` class logits (e.g. ``[B, GQ, K]`` or ``[L, B, GQ, K]``) of any float dtype; the terms
            are computed in float32 (float64 stays float64), and with ``recompute`` bf16 logits stay bf16 for the
            backward pass.
        cells: one ``[M]`` int64 index tensor per dimension of ``logits`` (the last one holds the labels); each
            cell at most once.
        src_xyxy: ``[M, 4]`` detached predicted boxes of the matched pairs; tgt_xyxy: ``[M, 4]`` targets.
        recompute: keep only the logits (in their own dtype), ``t`` and the matched cells' probabilities for the
            backward pass and compute the gradient there in closed form, one slice of the first dimension at a
            time, instead of autograd's five or six intermediates of the logits' size (at seg-medium, batch 8,
            six layers: 38 MiB each in float32, held from the criterion to the backward pass, when the step's
            memory peaks). Same values; gradients equal up to float32 rounding (test against autograd's), returned
            in the logits' dtype.
    """
    if recompute:
        return _IaBceTerms.apply(logits, cells, src_xyxy, tgt_xyxy, alpha, gamma)
    logits = _at_least_float32(logits)
    prob = logits.sigmoid()
    return _ia_bce(logits, prob, cells, _ia_targets(prob, cells, src_xyxy, tgt_xyxy, alpha), gamma)


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or as it is when already float32 or float64 (no copy then)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _ia_targets(prob: Tensor, cells: tuple[Tensor, ...], src_xyxy: Tensor, tgt_xyxy: Tensor, alpha: float) -> Tensor:
    """The detached target scores ``t`` of the matched cells: ``[M]``."""
    iou = matched_box_iou(src_xyxy, tgt_xyxy)[0]  # [M], boxes already detached
    return (prob[cells].pow(alpha) * iou.pow(1 - alpha)).clamp(min=0.01).detach()


def _ia_bce(logits: Tensor, prob: Tensor, cells: tuple[Tensor, ...], t: Tensor, gamma: float) -> Tensor:
    pos_weight = torch.zeros_like(logits).index_put(cells, t)
    neg_weight = prob.pow(gamma).index_put(cells, 1 - t)
    # -w+ log p - w- log(1-p) with log(1-p) = log p - x, written with the stable logsigmoid.
    return neg_weight * logits - F.logsigmoid(logits) * (pos_weight + neg_weight)


class _IaBceTerms(torch.autograd.Function):
    """:func:`ia_bce_terms` that saves the logits only and differentiates in closed form.

    With ``p = sigmoid(x)`` and ``softplus(x) = -log(1 - p)``: a negative cell's term is ``p^g softplus(x)``, whose
    derivative is ``p^g (g (1 - p) softplus(x) + p)``; a matched cell's is ``(1 - t) x - log p`` (``t`` and
    ``1 - t`` detached), whose derivative is ``p - t``.

    This backward runs early in the step's backward pass, while its memory peaks, so it holds little: the saved
    logits in their own dtype (bf16 under autocast: half the float32 copy), the gradient in that dtype, and float32
    temporaries of one slice of the first dimension (one layer of ``[L, B, GQ, K]``) at a time.
    """

    @staticmethod
    def forward(ctx, logits, cells, src_xyxy, tgt_xyxy, alpha, gamma):  # type: ignore[override]
        x = _at_least_float32(logits)
        prob = x.sigmoid()
        t = _ia_targets(prob, cells, src_xyxy, tgt_xyxy, alpha)
        # p at the matched cells as the whole-tensor sigmoid gave it, for the matched cells' gradient p - t
        ctx.save_for_backward(logits, t, prob[cells], *cells)
        ctx.gamma = gamma
        return _ia_bce(x, prob, cells, t, gamma)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        logits, t, matched_prob, *cells = ctx.saved_tensors
        cells = tuple(cells)
        grad_logits = torch.empty_like(logits)
        for i in range(logits.shape[0]):
            x = _at_least_float32(logits[i])
            prob = x.sigmoid()
            # slope = softplus(x) (1 - p) g + p, then times p^g (in place: two float32 slices live at a time)
            slope = F.softplus(x)
            del x
            slope.addcmul_(slope, prob, value=-1.0).mul_(ctx.gamma).add_(prob).mul_(prob.pow_(ctx.gamma))
            grad_logits[i] = slope.mul_(grad[i])  # cast to the logits' dtype on the copy
        grad_logits[cells] = ((matched_prob - t) * grad[cells]).to(grad_logits.dtype)
        return grad_logits, None, None, None, None, None


def point_mask_terms(point_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean point BCE and Dice loss per mask: ``[M, P]`` logits and {0, 1} labels -> two ``[M]``."""
    bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none").mean(1)  # [M]
    prob = point_logits.sigmoid()
    dice = 1 - (2 * (prob * labels).sum(-1) + 1) / (prob.sum(-1) + labels.sum(-1) + 1)  # [M]
    return bce, dice
