"""The criterion's losses for all output layers in one batched pass.

The model's training output has ``L`` same-shaped layers (the decoder layers and the two-stage proposals), each
matched on its own. Looping over them costs ``L`` times the kernel launches and autograd nodes of one layer,
and on a GPU those launches, not the arithmetic, bound the step. Here the layers are stacked once
(``[L, B, GQ, ...]``), the matched pairs of all layers are concatenated with a layer index, every loss term is
computed once over ``L * M`` pairs (or ``L * B * GQ * K`` class cells) and summed per layer. The results equal
the per-layer pass up to float32 summation order; the loss-point sampler is still called once per layer, in
layer order, so it draws the same random numbers as the per-layer pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_train.losses import mask_entries
from rfdetr_train.losses.box_ops import box_cxcywh_to_xyxy, matched_generalized_box_iou
from rfdetr_train.losses.loss_terms import ia_bce_terms, point_mask_terms
from rfdetr_train.losses.point_sampling import loss_num_points, sample_biased_products
from rfdetr_train.losses.targets import LayerMatches, TargetBatch


def can_batch_layers(layers: Sequence[dict[str, Any]], matches: Sequence[LayerMatches]) -> bool:
    """Whether :func:`batched_layer_losses` applies: 2+ layers of equal shapes (dtypes may differ), equal pair
    counts per image in every layer, and at least one matched pair (an empty batch takes the per-layer pass,
    which keeps every mask output in the graph with a zero loss)."""
    if len(layers) < 2 or len(matches) != len(layers) or matches[0].num_pairs == 0:
        return False
    first = layers[0]
    keys = ("pred_logits", "pred_boxes")
    for out, match in zip(layers, matches):
        if any(out[k].shape != first[k].shape for k in keys):
            return False
        if match.counts != matches[0].counts:
            return False
        if mask_entries.signature(out.get("pred_masks")) != mask_entries.signature(first.get("pred_masks")):
            return False
    return True


def _stack(layers: Sequence[dict[str, Any]], key: str) -> Tensor:
    return torch.stack([out[key].float() for out in layers])


def _pad_slots(batch_idx: Tensor, counts: Sequence[int]) -> tuple[Tensor, int]:
    """Position ``b * maxn + j`` of the ``j``-th pair of image ``b`` in a ``[B, maxn]`` padded layout.

    ``batch_idx [M]`` is sorted (pairs image by image), so a pair's rank within its image is its index minus the
    first index of its image (``searchsorted``): device ops only, no host copy, and traceable by
    ``torch.compile`` with the pair count dynamic.
    """
    maxn = max(counts)
    position = torch.arange(batch_idx.shape[0], device=batch_idx.device)  # [M]
    first = torch.searchsorted(batch_idx, batch_idx)  # [M] index of the first pair of the same image
    return batch_idx * maxn + (position - first), maxn


def _layer_mask_products(
    layers: Sequence[dict[str, Any]], matches: Sequence[LayerMatches]
) -> Iterator[tuple[Tensor, Tensor, int, int]]:
    """Mask logits of each layer's matched queries, one layer at a time: yields ``[M, h*w]`` products (the logits
    before their bias, in the features' dtype), ``[M]`` float32 biases, ``h`` and ``w``.

    Lazy entries: each layer's products run in its spatial map's own dtype (bf16 under autocast, as upstream's
    criterion inside autocast) on the map itself, so no stacked or float32 copy of the ``[B, C, h, w]`` maps
    is kept for the backward pass (at seg-medium, batch 8: 6 maps of 91 MiB each in float32).
    """
    masks = [out["pred_masks"] for out in layers]
    if isinstance(masks[0], Tensor):
        height, width = masks[0].shape[-2:]
        for m, match in zip(masks, matches, strict=True):
            products = m[match.batch_idx, match.query_idx].flatten(1)  # [B, GQ, h, w] -> [M, h*w]
            yield products, products.new_zeros(products.shape[0], dtype=torch.float32), height, width
        return
    bsz, channels, height, width = masks[0]["spatial_features"].shape
    # Each pair's logits are its query's dot product with its own image's map: per layer one batched product
    # over the B maps, with each image's pairs padded to the largest image's count.
    slots, maxn = _pad_slots(matches[0].batch_idx, matches[0].counts)  # [M] rows of [B*maxn]
    for m, match in zip(masks, matches, strict=True):
        spatial = m["spatial_features"]  # [B, C, h, w]
        query = m["query_features"][match.batch_idx, match.query_idx].to(spatial.dtype)  # [M, C]
        bias = mask_entries.query_bias(m)[match.batch_idx, match.query_idx].float()  # [M]
        q_pad = query.new_zeros(bsz * maxn, channels).index_copy(0, slots, query)
        padded = torch.bmm(q_pad.view(bsz, maxn, channels), spatial.flatten(2))  # [B, maxn, h*w]
        yield padded.view(-1, height * width)[slots], bias, height, width


def _matched_point_logits(
    criterion: Any,
    layers: Sequence[dict[str, Any]],
    batch: TargetBatch,
    matches: Sequence[LayerMatches],
    objects: Tensor,
) -> tuple[Tensor, Tensor]:
    """Every layer's matched mask logits and ground truth at that layer's loss points: -> two ``[L*M, P]``
    float32 (layer after layer; the ground truth in {0, 1}). ``objects [L*M]``: each pair's object in the
    concatenated targets, layer after layer.

    One layer at a time: a layer's ``[M, h, w]`` float32 logits exist only while its points are drawn and
    sampled, and the sampling keeps the layer's products (bf16 under autocast) for the backward pass instead of
    the float32 logits (:func:`~rfdetr_train.losses.point_sampling.sample_biased_products`). All this runs
    while every activation of the forward is alive, when the step's memory peaks. The point sampler is called once per layer, in layer order, as in the
    per-layer pass. The ground truth of all layers' points is looked up at once afterwards (one set of ~18
    launches instead of one per layer; the points kept until then are ``[L*M, P, 2]`` float32, 30 MB at
    seg-medium, batch 8).
    """
    point_logits, points = [], []
    for products, bias, height, width in _layer_mask_products(layers, matches):
        num_points = loss_num_points(height, width, criterion.mask_point_sample_ratio)
        with torch.no_grad():
            logits = (products.float() + bias[:, None]).view(-1, 1, height, width)
            points.append(criterion.point_sampler(logits, num_points).float())  # [M, P, 2]
        point_logits.append(sample_biased_products(products, bias, logits, points[-1]))  # [M, P]
        del logits
    with torch.no_grad():
        labels = batch.sample_masks(objects, torch.cat(points))  # [L*M, P]
    return torch.cat(point_logits), labels


def batched_layer_losses(
    criterion: Any,
    layers: Sequence[dict[str, Any]],
    batch: TargetBatch,
    matches: Sequence[LayerMatches],
    num_boxes: Tensor,
) -> dict[str, Tensor]:
    """Unweighted losses of every layer (each a ``[L]`` tensor, layers in the given order).

    Args:
        criterion: the :class:`~rfdetr_train.losses.SetCriterion` (its alpha, gamma, segmentation flag, point
            ratio and loss-point sampler).
        layers: output dicts accepted by :func:`can_batch_layers`.
        batch: the packed targets; matches: one :class:`LayerMatches` per layer; num_boxes: the normaliser.
    """
    num_layers, num_pairs = len(layers), matches[0].num_pairs
    # in the layers' own dtype (bf16 under autocast; float32 if any layer is): the class loss computes in float32
    # and keeps these for its backward pass, half the bytes of a float32 stack
    logits = torch.stack([out["pred_logits"] for out in layers])  # [L, B, GQ, K]
    boxes = _stack(layers, "pred_boxes")  # [L, B, GQ, 4]
    layer = torch.arange(num_layers, device=logits.device).repeat_interleave(num_pairs)  # [L*M]
    b = torch.cat([m.batch_idx for m in matches])  # [L*M]
    q = torch.cat([m.query_idx for m in matches])
    t = torch.cat([m.flat_target_idx for m in matches])
    src_boxes = boxes[layer, b, q]  # [L*M, 4]
    tgt_boxes = batch.boxes[t]
    src_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)

    cells = (layer, b, q, batch.labels[t])
    # Summed right away: the [L, B, GQ, K] terms are not kept through the mask losses below.
    ce = ia_bce_terms(
        logits, cells, src_xyxy.detach(), tgt_xyxy, criterion.focal_alpha, criterion.focal_gamma, recompute=True
    ).flatten(1).sum(1)  # [L, B, GQ, K] -> [L]
    losses = {
        "loss_ce": ce,
        "loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="none").view(num_layers, -1).sum(1),
        "loss_giou": (1 - matched_generalized_box_iou(src_xyxy, tgt_xyxy)).view(num_layers, -1).sum(1),
    }
    if criterion.segmentation:
        point_logits, labels = _matched_point_logits(criterion, layers, batch, matches, t)  # two [L*M, P]
        bce, dice = point_mask_terms(point_logits, labels)  # two [L*M]
        losses["loss_mask_ce"] = bce.view(num_layers, num_pairs).sum(1)
        losses["loss_mask_dice"] = dice.view(num_layers, num_pairs).sum(1)
    return {name: value / num_boxes for name, value in losses.items()}
