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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rfdetr_train.losses import mask_entries
from rfdetr_train.losses.box_ops import box_cxcywh_to_xyxy, matched_generalized_box_iou
from rfdetr_train.losses.loss_terms import ia_bce_terms, point_mask_terms
from rfdetr_train.losses.point_sampling import (
    biased_maps,
    loss_num_points,
    sample_biased_products,
    sample_points,
    sample_points_backward,
)
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


def _query_products(query: Tensor, spatial: Tensor, slots: Tensor, maxn: int) -> tuple[Tensor, Tensor]:
    """Each matched query's dot product with its own image's map: ``query [M, C]``, ``spatial [B, C, h*w]`` ->
    ``(products [M, h*w], q_pad [B, maxn, C])``, one batched product over the ``B`` maps with each image's pairs
    padded to ``maxn`` (``slots [M]``: each pair's row of ``[B*maxn]``, from :func:`_pad_slots`)."""
    bsz, channels, _ = spatial.shape
    q_pad = query.new_zeros(bsz * maxn, channels).index_copy(0, slots, query).view(bsz, maxn, channels)
    padded = torch.bmm(q_pad, spatial)  # [B, maxn, h*w]
    return padded.view(bsz * maxn, -1)[slots], q_pad


class _QueryMapPoints(torch.autograd.Function):
    """``sample_points`` of the float32 maps ``products + bias`` of lazy mask entries, keeping neither the products
    ``[M, h*w]`` nor the maps for the backward pass: the products are recomputed there from the queries and the
    spatial map, which stays alive anyway (seg-medium, batch 8: 6 layers x ~20 MiB of bf16 products no longer held
    from the criterion to the backward pass, when the step's memory peaks). The backward pass runs the kernels
    autograd would run through ``bmm``, the row gather and ``grid_sample``, on the same values.

    ``forward(query [M, C], spatial [B, C, h*w], bias [M] float32, maps [M, 1, h, w] float32 (no grad: already
    built for the point sampler), coords [M, P, 2], slots [M], maxn) -> [M, P]`` float32.
    """

    @staticmethod
    def forward(ctx, query, spatial, bias, maps, coords, slots, maxn):  # type: ignore[override]
        ctx.save_for_backward(query, spatial, bias, coords, slots)
        ctx.maxn = maxn
        ctx.size = maps.shape[-2:]
        return sample_points(maps, coords)[:, 0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        query, spatial, bias, coords, slots = ctx.saved_tensors
        height, width = ctx.size
        products, q_pad = _query_products(query, spatial, slots, ctx.maxn)
        maps = biased_maps(products, bias, height, width)
        del products
        grad_maps = sample_points_backward(grad, maps, coords)  # [M, h*w] float32
        del maps
        grad_bias = grad_maps.sum(1) if ctx.needs_input_grad[2] else None
        grad_products = grad_maps.to(spatial.dtype)
        del grad_maps  # (this backward runs while the step's memory peaks: each float32 copy is freed early)
        # the row gather's and bmm's backward: [M, h*w] -> padded [B, maxn, h*w] -> the two factors
        bsz = spatial.shape[0]
        grad_padded = grad_products.new_zeros(bsz * ctx.maxn, height * width)
        grad_padded.index_copy_(0, slots, grad_products)
        del grad_products
        grad_padded = grad_padded.view(bsz, ctx.maxn, -1)
        grad_query = grad_spatial = None
        if ctx.needs_input_grad[0]:
            grad_query = grad_padded.bmm(spatial.transpose(1, 2)).view(bsz * ctx.maxn, -1).index_select(0, slots)
        if ctx.needs_input_grad[1]:
            grad_spatial = _in_layout_of(spatial, q_pad.transpose(1, 2), grad_padded)
        return grad_query, grad_spatial, grad_bias, None, None, None, None


def _in_layout_of(spatial: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``left [B, C, n] @ right [B, n, hw] -> [B, C, hw]`` with the strides of ``spatial [B, C, hw]``.

    A compiled model's maps can come out channels-last (``spatial`` then has strides ``(hw*C, 1, C)``: inductor lays
    them out so on CUDA, by the H100 trace cited next), and its backward graph copies an incoming gradient into the
    layout its forward output had (``coerce_to_expected_memory_format``): with a contiguous gradient, one more
    ``[B, C, h, w]`` copy per layer while the step's memory peaks (seg-medium, batch 8, H100 2026-12-08: 6 x 45.6
    MiB alive at the peak). Computed as ``(right^T @ left^T)^T`` the product is born in the map's layout; same
    sums, one product each way.
    """
    if spatial.dim() == 3 and spatial.stride(1) == 1 and spatial.transpose(1, 2).is_contiguous():
        return right.transpose(1, 2).bmm(left.transpose(1, 2)).transpose(1, 2)
    return left.bmm(right)


def _draw_points(criterion: Any, products: Tensor, bias: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """No grad: the float32 mask logits ``products [M, h*w] + bias [M]`` as maps ``[M, 1, h, w]`` and the loss
    points the criterion's sampler draws on them ``[M, P, 2]`` (the maps exist for this layer only)."""
    with torch.no_grad():
        maps = biased_maps(products, bias, height, width)
        num_points = loss_num_points(height, width, criterion.mask_point_sample_ratio)
        return maps, criterion.point_sampler(maps, num_points).float()


def _dense_point_logits(criterion: Any, masks: Tensor, match: LayerMatches) -> tuple[Tensor, Tensor]:
    """Dense mask logits ``[B, GQ, h, w]``: the matched rows at their loss points, ``([M, P] float32, [M, P, 2])``,
    keeping the gathered rows (not float32 maps) for the backward pass (:func:`sample_biased_products`)."""
    height, width = masks.shape[-2:]
    products = masks[match.batch_idx, match.query_idx].flatten(1)  # [M, h*w]
    bias = products.new_zeros(products.shape[0], dtype=torch.float32)
    maps, points = _draw_points(criterion, products, bias, height, width)
    return sample_biased_products(products, bias, maps, points), points


def _lazy_point_logits(
    criterion: Any, entry: dict[str, Tensor], match: LayerMatches, pad: tuple[Tensor, int]
) -> tuple[Tensor, Tensor]:
    """Lazy mask entries: the matched queries' mask logits at their loss points, ``([M, P] float32, [M, P, 2])``.

    Each product runs in the spatial map's own dtype (bf16 under autocast, as upstream's criterion inside autocast)
    on the map itself, so no float32 copy of the ``[B, C, h, w]`` map is made (at seg-medium, batch 8: 91 MiB per
    layer), and :class:`_QueryMapPoints` keeps neither the products nor the maps for the backward pass.
    ``pad``: :func:`_pad_slots` of the batch.
    """
    height, width = entry["spatial_features"].shape[-2:]
    spatial = entry["spatial_features"].flatten(2)  # [B, C, h*w] (a view)
    query = entry["query_features"][match.batch_idx, match.query_idx].to(spatial.dtype)  # [M, C]
    bias = mask_entries.query_bias(entry)[match.batch_idx, match.query_idx].float()  # [M]
    with torch.no_grad():
        products = _query_products(query, spatial, *pad)[0]
    maps, points = _draw_points(criterion, products, bias, height, width)
    del products
    return _QueryMapPoints.apply(query, spatial, bias, maps, points, *pad), points


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

    One layer at a time (:func:`_lazy_point_logits`, :func:`_dense_point_logits`): a layer's ``[M, h, w]``
    float32 logits exist only while its points are drawn and sampled, and the sampling keeps neither them nor
    (lazy entries) the products for the backward pass. All this runs while every activation of the forward is alive, when the
    step's memory peaks. The point sampler is called once per layer, in layer order, as in the per-layer pass.
    The ground truth of all layers' points is looked up at once afterwards (one set of ~18 launches instead of
    one per layer; the points kept until then are ``[L*M, P, 2]`` float32, 30 MB at seg-medium, batch 8).
    """
    pad = _pad_slots(matches[0].batch_idx, matches[0].counts)  # lazy entries: the same rows in every layer
    point_logits, points = [], []
    for out, match in zip(layers, matches, strict=True):
        masks = out["pred_masks"]
        if isinstance(masks, Tensor):
            sampled, drawn = _dense_point_logits(criterion, masks, match)
        else:
            sampled, drawn = _lazy_point_logits(criterion, masks, match, pad)
        point_logits.append(sampled)  # [M, P]
        points.append(drawn)
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
