"""Raw model outputs -> detections, in two halves.

**Graph-safe half** (tensors in, tensors out, static shapes, no host sync; runs inside
:class:`rfdetr_core.deploy.DeployModel` and so inside exported ONNX / TensorRT graphs):
:func:`select_topk` and :func:`select_detections`. The selection rule is upstream RF-DETR's
``PostProcess`` (rfdetr 1.11.2; rfdetr-upstream.md section 4), so evaluation numbers match: sigmoid over every
query x slot pair, the ``num_select`` best of the flattened ``Q*S`` scores in descending order;
``slot = index % S``, ``query = index // S`` (one query can give several detections with different classes).

*Tie rule*: pairs with equal scores are ordered lower flattened index first, and when equal scores straddle
the ``num_select``-th place the lower indexes are kept, i.e. exactly a stable descending sort. It is computed
with ``topk`` (for the ``num_select``-th score), a cumulative count of the ties, a stable partition (cumulative
count and scatter) and a ``K x K`` rank, so no full sort of ``Q*S`` values and no data-dependent shape enters
an exported graph (ONNX/TensorRT ``TopK`` has a size limit and no stability guarantee across backends). On CUDA
outside export it is one stable sort, which is faster there (the same result; both tested against each other).

**Host half** (:func:`finish_detections`): per image, drop pairs below the score threshold and pairs whose
label is ``-1`` (a slot without a class), scale the boxes to the source size, and turn the kept mask logits
into bool masks or COCO RLE at the source size. Mask logits are upsampled bilinearly (``align_corners=False``)
and thresholded at logit 0, only for the kept detections, in chunks sized by a pixel budget; a query picked
with several classes (identical mask-logit rows) is upsampled once. ``RFDETR.predict``, rfdetr-train's
``Evaluator``, export's runtime check and serve all call these two halves.

On a CUDA device the host half runs for the batch as a whole (``batched``): one host copy of the keep mask,
one gather of the kept rows of every image, one upsampling pass per source size and, with
``mask_format="rle"``, one RLE encoding pass on the device; the number of device synchronisations no longer
grows with the batch (per image, they cost more than the GPU work at batch 8). The results are the same as
the per-image path's (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Float elements per interpolation chunk. On CPU about 1M (4 MB of float32, 2 MB per thread on 2 cores)
# keeps the chunk's output in a core's L2 cache: 200 masks of 108x108 to 640x480 took 90 ms against 131 ms
# with 4M (2-core Xeon with 2 MB L2 per core, 2026-12-07; 4M had beaten 32 masks per chunk 2x on an EPYC).
# GPUs prefer larger launches.
_CPU_CHUNK_ELEMENTS = 2**20
_GPU_CHUNK_ELEMENTS = 64 * 2**20


# -- graph-safe half -----------------------------------------------------------------------------------------
def select_topk(logits: torch.Tensor, num_select: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``num_select`` (query, slot) pairs per image, as upstream's ``PostProcess`` picks them (graph-safe).

    Args:
        logits: ``[B, Q, S]`` class logits.
        num_select: pairs to keep per image (capped at ``Q*S``).

    Returns:
        ``scores [B, N]`` (sigmoid, descending), ``slots [B, N]`` and ``queries [B, N]`` (int64), with
        ``N = min(num_select, Q*S)``; equal to ``argsort(descending=True, stable=True)[:, :N]`` of the
        flattened scores, ties included (see the module docstring).
    """
    if logits.ndim != 3:
        raise ValueError(f"pred_logits must be [B, Q, S], got shape {tuple(logits.shape)}")
    if num_select < 0:
        raise ValueError(f"num_select must be >= 0, got {num_select}")
    batch, _, num_slots = logits.shape
    probs = logits.sigmoid().reshape(batch, -1)  # [B, Q*S]
    total = probs.shape[1]
    n = min(int(num_select), total)
    if n == 0:
        empty = probs.new_zeros((batch, 0), dtype=torch.int64)
        return probs[:, :0], empty, empty
    if probs.is_cuda and not torch.compiler.is_exporting():
        index = _stable_descending_order(probs)[:, :n]
    else:
        index = _top_pairs_in_order(probs, n)
    return probs.gather(1, index), index % num_slots, index // num_slots


def _stable_descending_order(probs: torch.Tensor) -> torch.Tensor:
    """``probs [B, T]`` -> ``[B, T]`` indexes by (score descending, index ascending): one stable sort.

    The CUDA path: inside a CUDA graph on an H100 this took 0.06-0.09 ms against 0.13-0.26 ms for
    :func:`_top_pairs_in_order` (``benchmarks/select_speed.py``, 2026-12-07; ``topk`` runs single-block kernels
    there). Not used when exporting: ONNX/TensorRT ``TopK`` is bounded and unstable."""
    return probs.sort(dim=1, descending=True, stable=True).indices


def _top_pairs_in_order(probs: torch.Tensor, n: int) -> torch.Tensor:
    """``probs [B, T]`` -> ``[B, n]`` the first ``n`` of :func:`_stable_descending_order` without a full sort:
    ``topk`` for the ``n``-th score, a cumulative count of the ties, a stable partition and an ``n x n`` rank
    (the exported graph's and the CPU's path)."""
    batch, total = probs.shape
    kth = probs.topk(n, dim=1).values[:, n - 1 :]  # [B, 1] the n-th best score
    above = probs > kth
    ties = probs == kth
    room = n - above.sum(dim=1, keepdim=True)  # [B, 1] places left for pairs equal to the n-th score
    chosen = above | (ties & (ties.cumsum(dim=1) <= room))  # [B, T], exactly n per row
    # the chosen indexes in ascending order by a stable partition (chosen first, each side in index order):
    # a cumulative count and one scatter of a permutation, where a second topk over int64 keys plus a sort
    # ran as single-block kernels on CUDA (0.23-0.45 ms against 0.13-0.26 ms in a CUDA graph on an H100)
    position = torch.arange(total, device=probs.device)  # [T]
    chosen_before = chosen.cumsum(dim=1)  # [B, T] chosen pairs up to and including this one
    slot = torch.where(chosen, chosen_before - 1, n + position - chosen_before)  # [B, T] a permutation
    index = torch.empty_like(slot).scatter_(1, slot, position.expand(batch, total))[:, :n]  # [B, n]
    scores = probs.gather(1, index)  # [B, n]
    # rank by (score descending, index ascending): [B, n, n] pairwise comparisons
    earlier = torch.ones(n, n, dtype=torch.bool, device=probs.device).tril(-1)  # [j, l]: l < j
    s_j, s_l = scores[:, :, None], scores[:, None, :]
    rank = ((s_l > s_j) | ((s_l == s_j) & earlier)).sum(dim=2)  # [B, n] final place of each pair
    order = torch.empty_like(rank).scatter_(1, rank, torch.arange(n, device=probs.device).expand(batch, n))
    return index.gather(1, order)


def gather_boxes(boxes_cxcywh: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Selected boxes as xyxy normalised to the image and clamped to ``[0, 1]`` (graph-safe).

    Args:
        boxes_cxcywh: ``[B, Q, 4]`` normalised (cx, cy, w, h).
        queries: ``[B, N]`` selected query indexes.

    Returns:
        ``[B, N, 4]`` (x0, y0, x1, y1) in ``[0, 1]``; multiplying by ``(W, H, W, H)`` gives the same pixels as
        clamping after scaling.
    """
    picked = boxes_cxcywh.gather(1, queries.unsqueeze(-1).expand(-1, -1, 4))  # [B, N, 4]
    cx, cy, w, h = picked.unbind(-1)
    # A negative width/height is treated as 0, as upstream's cxcywh -> xyxy does.
    w, h = w.clamp_min(0.0), h.clamp_min(0.0)
    xyxy = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
    # Box regression is unbounded; clamp to the image like upstream.
    return xyxy.clamp(0.0, 1.0)


def select_detections(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor | None,
    slot_category: torch.Tensor,
    num_select: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The graph-safe half: the top ``K`` pairs with labels, boxes and mask logits (static shapes).

    Args:
        logits: ``[B, Q, S]`` class logits; boxes: ``[B, Q, 4]`` normalised cxcywh;
        masks: ``[B, Q, h, w]`` mask logits or ``None``.
        slot_category: ``[S]`` int64, the dataset category id of each slot, ``-1`` for slots without a class
            (``ClassMap.slot_to_category_table()``).
        num_select: ``K`` pairs kept per image (capped at ``Q*S``).

    Returns:
        ``scores [B, K]`` (sigmoid, descending), ``labels [B, K]`` int64 category ids (``-1``: slot without
        class), ``boxes [B, K, 4]`` xyxy normalised to ``[0, 1]``, ``masks [B, K, h, w]`` mask logits of the
        selected queries (``None`` without masks).
    """
    return _select(logits, boxes, masks, slot_category, num_select)[:4]


def _select(logits, boxes, masks, slot_category, num_select):
    """:func:`select_detections` plus the ``queries [B, K]`` of the pairs (for :func:`postprocess`)."""
    scores, slots, queries = select_topk(logits, num_select)
    labels = slot_category.to(slots.device)[slots]  # [B, K]
    picked = gather_boxes(boxes, queries)
    picked_masks = None
    if masks is not None:
        q, h, w = masks.shape[1:]
        # rows of masks.flatten(0, 1): one row gather, where gather with an index expanded over h x w would be
        # materialised by an exported graph (an int64 Expand of K x h x w, ~3 ms of seg-medium's ONNX run)
        rows = queries + torch.arange(queries.shape[0], device=queries.device)[:, None] * q  # [B, K]
        picked_masks = masks.flatten(0, 1).index_select(0, rows.reshape(-1)).reshape(-1, queries.shape[1], h, w)
    return scores, labels, picked, picked_masks, queries


# -- host half -----------------------------------------------------------------------------------------------
def boxes_to_pixels(
    boxes_cxcywh: torch.Tensor, queries: torch.Tensor, source_sizes: torch.Tensor
) -> torch.Tensor:
    """Selected boxes as xyxy in source pixels, clamped to the image.

    Args:
        boxes_cxcywh: ``[B, Q, 4]`` normalised (cx, cy, w, h).
        queries: ``[B, N]`` selected query indexes.
        source_sizes: ``[B, 2]`` (height, width) of each source image.

    Returns:
        ``[B, N, 4]`` (x0, y0, x1, y1) with ``0 <= x <= width``, ``0 <= y <= height``.
    """
    return scale_boxes(gather_boxes(boxes_cxcywh, queries), source_sizes)


def scale_boxes(boxes_xyxy: torch.Tensor, source_sizes: torch.Tensor) -> torch.Tensor:
    """``[B, N, 4]`` normalised xyxy -> source pixels (``source_sizes [B, 2]`` as (height, width))."""
    height, width = source_sizes.to(boxes_xyxy.dtype).unbind(1)
    scale = torch.stack((width, height, width, height), dim=1)[:, None, :]  # [B, 1, 4]
    return boxes_xyxy * scale


def upsample_masks(
    mask_logits: torch.Tensor,
    size: tuple[int, int],
    chunk_elements: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask logits ``[N, h, w]`` -> bool masks ``[N, H, W]`` at ``size = (H, W)``.

    Bilinear (``align_corners=False``) upsampling of the logits, then ``> 0``: the same pixels as upstream.
    Runs in chunks of about ``chunk_elements`` output floats (a device-dependent default) so memory stays
    bounded for large images. ``out`` (bool ``[N, H, W]``, e.g. a slice of a larger tensor) receives the result.
    """
    if mask_logits.ndim != 3:
        raise ValueError(f"mask logits must be [N, h, w], got shape {tuple(mask_logits.shape)}")
    height, width = int(size[0]), int(size[1])
    n = mask_logits.shape[0]
    if out is None:
        out = torch.empty((n, height, width), dtype=torch.bool, device=mask_logits.device)
    if n == 0:
        return out
    if tuple(mask_logits.shape[-2:]) == (height, width):
        return torch.gt(mask_logits, 0.0, out=out)
    if chunk_elements is None:
        chunk_elements = _GPU_CHUNK_ELEMENTS if mask_logits.device.type == "cuda" else _CPU_CHUNK_ELEMENTS
    step = max(1, chunk_elements // max(1, height * width))
    for start in range(0, n, step):
        part = mask_logits[start : start + step].unsqueeze(1)  # [n, 1, h, w]
        up = F.interpolate(part, size=(height, width), mode="bilinear", align_corners=False)
        torch.gt(up.squeeze(1), 0.0, out=out[start : start + step])
    return out


def unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Identical rows of ``rows [N, ...]`` found once: ``(first [U], inverse [N])`` with
    ``rows[first][inverse] == rows`` exactly.

    Rows are hashed by one dot product with fixed weights, and the grouping is verified; on a hash collision
    every row counts as its own (correct, just without the saving).
    """
    n = rows.shape[0]
    ar = torch.arange(n, device=rows.device)
    if n < 2:
        return ar, ar
    flat = rows.reshape(n, -1).double()  # [N, D]
    weights = (torch.arange(flat.shape[1], device=rows.device, dtype=torch.float64) * 0.6180339887).frac()
    _, inverse = torch.unique(flat @ (weights + 0.5), return_inverse=True)  # [N]
    first = torch.full((int(inverse.max()) + 1,), n, device=rows.device).scatter_reduce(
        0, inverse, ar, reduce="amin"
    )
    if not torch.equal(flat[first[inverse]], flat):
        return ar, ar
    return first, inverse


def _masks_of(mask_logits: torch.Tensor, size: tuple[int, int], chunk_elements: int | None) -> torch.Tensor:
    """Bool masks ``[N, H, W]`` of ``mask_logits [N, h, w]``, a repeated row upsampled once."""
    if mask_logits.shape[0] == 0:
        return torch.empty((0, *size), dtype=torch.bool, device=mask_logits.device)
    first, inverse = unique_rows(mask_logits)
    if first.numel() == mask_logits.shape[0]:
        return upsample_masks(mask_logits, size, chunk_elements)
    up = upsample_masks(mask_logits.index_select(0, first), size, chunk_elements)  # [U, H, W]
    # advanced indexing: measured several times faster than index_select for bool rows on CPU
    return up[inverse]


def _rles_of(mask_logits: torch.Tensor, size: tuple[int, int], rle_options: Mapping[str, Any]):
    """``(rles, areas, boundary_rles)`` of ``mask_logits [N, h, w]`` at ``size``, a repeated row once."""
    from rfdetr_core.mask_rle import logits_to_rle

    first, inverse = unique_rows(mask_logits)
    rles, areas, bounds = logits_to_rle(mask_logits.index_select(0, first), size, **rle_options)
    inv = inverse.cpu().numpy()
    return (
        [rles[j] for j in inv],
        np.asarray(areas)[inv],
        [bounds[j] for j in inv] if bounds is not None else None,
    )


def _as_size_tensor(source_sizes, batch: int, device) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``[B, 2]`` float sizes on ``device`` and the same sizes as Python ints (read before the copy, so
    no device synchronisation is needed to get them back)."""
    sizes = torch.as_tensor(source_sizes, dtype=torch.float32).cpu()
    if sizes.shape != (batch, 2):
        raise ValueError(
            f"source_sizes must hold {batch} (height, width) pairs, got shape {tuple(sizes.shape)}"
        )
    size_list = [(int(h), int(w)) for h, w in sizes.round().long().tolist()]
    # non-blocking: a blocking host-to-device copy waits for the stream, i.e. for the network still running
    # on it, before the host half's first kernels can be queued (the host tensor is staged by the copy call)
    return sizes.to(device, non_blocking=True), size_list


def default_mask_format(device: torch.device | str) -> str:
    """The mask format the host half returns by default for outputs on ``device``: ``"rle"`` on CUDA (dense
    full-size bool masks cost more to copy to the host than to encode there), ``"bool"`` elsewhere."""
    return "rle" if torch.device(device).type == "cuda" else "bool"


def finish_detections(
    scores: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor | None,
    source_sizes: Sequence[tuple[int, int]] | torch.Tensor,
    *,
    threshold: float | None = None,
    mask_format: str = "bool",
    host: bool = False,
    batched: bool | None = None,
    chunk_elements: int | None = None,
    rle_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The host half: per-image detections at the source size from the graph-safe half's outputs.

    Args:
        scores, labels, boxes, masks: :func:`select_detections`' outputs (``[B, K]``, ``[B, K]``,
            ``[B, K, 4]`` normalised xyxy, ``[B, K, h, w]`` mask logits or ``None``), from any runtime.
        source_sizes: ``B`` pairs (height, width) of the source images (a list or a ``[B, 2]`` tensor).
        threshold: keep only ``score > threshold`` (strict, as upstream); ``None`` keeps all.
        mask_format: ``"bool"`` (``masks [N, H, W]`` on the outputs' device), ``"rle"`` (``rles``: N COCO RLE
            dicts) or ``"none"``. RLE comes from the upsampled bool masks (:func:`rfdetr_core.mask_rle.
            encode_masks`, on the device), or, with ``rle_options``, straight from the logits
            (:func:`rfdetr_core.mask_rle.logits_to_rle`: crop-wise, with ``areas`` and ``boundary_rles``).
        host: return ``scores``, ``labels``, ``index`` and ``boxes`` on the CPU (one copy for the batch).
        batched: the whole-batch implementation (default: on CUDA devices, without ``rle_options``) or the
            per-image one; same results.
        chunk_elements: mask upsampling chunk budget (see :func:`upsample_masks`).
        rle_options: keyword arguments of ``logits_to_rle`` (``threshold``, ``pixel_budget``, ``boundary``,
            ``host_encode_large``); per-image path only.

    Returns:
        One dict per image, rows in descending score order, pairs with label ``-1`` dropped: ``scores [N]``,
        ``labels [N]`` (category ids, int64), ``index [N]`` (position among the ``K``, int64), ``boxes [N, 4]``
        xyxy source pixels; with masks, ``masks [N, H, W]`` bool or ``rles`` (N dicts), plus ``areas``
        (``[N]`` float64) and ``boundary_rles`` (``None`` without a ``boundary`` option) with ``rle_options``.
    """
    if mask_format not in ("bool", "rle", "none"):
        raise ValueError(f"mask_format must be 'bool', 'rle' or 'none', got {mask_format!r}")
    batch = scores.shape[0]
    sizes, size_list = _as_size_tensor(source_sizes, batch, boxes.device)
    pixel_boxes = scale_boxes(boxes, sizes)  # [B, K, 4]
    keep = labels >= 0
    if threshold is not None:
        keep &= scores > threshold
    if mask_format == "none":
        masks = None
    if rle_options is None and (batched or (batched is None and scores.device.type == "cuda")):
        return _finish_batch(
            scores, labels, pixel_boxes, masks, keep, size_list, mask_format, host, chunk_elements
        )
    results = []
    for i in range(batch):
        idx = keep[i].nonzero(as_tuple=True)[0]  # one sync per image, then cheap integer indexing
        res: dict[str, Any] = {
            "scores": scores[i, idx],
            "labels": labels[i, idx],
            "index": idx,
            "boxes": pixel_boxes[i, idx],
        }
        if masks is not None:
            picked = masks[i].index_select(0, idx)  # [N, h, w]
            if rle_options is not None:
                res["rles"], res["areas"], res["boundary_rles"] = _rles_of(picked, size_list[i], rle_options)
            else:
                res["masks"] = _masks_of(picked, size_list[i], chunk_elements)
                if mask_format == "rle":
                    from rfdetr_core.mask_rle import encode_masks

                    res["rles"] = encode_masks(res.pop("masks"))
        if host:
            res = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in res.items()}
        results.append(res)
    return results


def _finish_batch(
    scores: torch.Tensor,
    labels: torch.Tensor,
    pixel_boxes: torch.Tensor,
    masks: torch.Tensor | None,
    keep: torch.Tensor,
    size_list: list[tuple[int, int]],
    mask_format: str,
    host: bool,
    chunk_elements: int | None,
) -> list[dict]:
    """:func:`finish_detections` for the whole batch at once (see the module docstring); same results.

    ``scores, labels, keep [B, K]``, ``pixel_boxes [B, K, 4]``, ``masks [B, K, h, w]`` logits or None.
    """
    batch, n = scores.shape
    device = scores.device
    index = torch.arange(n, device=device).expand(batch, n)
    if host:
        # one copy for the whole selection; float64 holds the float32 scores and boxes and the int64
        # labels and indexes exactly: [B, K, 8] = keep, score, label, index, box
        table = torch.cat(
            [t.to(torch.float64).unsqueeze(-1) for t in (keep, scores, labels, index)]
            + [pixel_boxes.double()],
            dim=-1,
        )
        rows_all = table.detach().cpu().numpy().reshape(batch * n, 8)
        keep_host = rows_all[:, 0].reshape(batch, n) > 0
    else:
        keep_host = keep.cpu().numpy()  # the one synchronisation of the selection
    counts = keep_host.sum(axis=1).tolist()
    flat_host = np.flatnonzero(keep_host.reshape(-1))  # [M] rows of [B*K]: image 0's kept rows, then 1's, ...
    flat = torch.from_numpy(flat_host).to(device, non_blocking=True)
    if host:
        rows = rows_all[flat_host]
        picked = {
            "scores": torch.from_numpy(rows[:, 1].astype(np.float32)),
            "labels": torch.from_numpy(rows[:, 2].astype(np.int64)),
            "index": torch.from_numpy(rows[:, 3].astype(np.int64)),
            "boxes": torch.from_numpy(np.ascontiguousarray(rows[:, 4:8], dtype=np.float32)),
        }
    else:
        picked = {
            "scores": scores.reshape(-1)[flat],
            "labels": labels.reshape(-1)[flat],
            "index": index.reshape(-1)[flat],
            "boxes": pixel_boxes.reshape(-1, 4)[flat],
        }
    parts = {k: torch.split(v, counts) for k, v in picked.items()}
    results = [{k: parts[k][i] for k in picked} for i in range(batch)]
    if masks is None:
        return results
    h, w = masks.shape[-2:]
    # one gather of every kept mask; a query kept with several classes is upsampled once per row here
    # (on the GPU that costs less than finding the repeats)
    logits = masks.reshape(batch * n, h, w).index_select(0, flat)  # [M, h, w]
    starts = np.concatenate([[0], np.cumsum(counts)])
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(size_list):
        by_size.setdefault(size, []).append(i)
    for size, images in by_size.items():
        if len(by_size) == 1:
            members_logits = logits  # one source size: every kept row, already in order
        else:
            members = torch.from_numpy(
                np.concatenate([np.arange(starts[i], starts[i + 1]) for i in images]).astype(np.int64)
            ).to(device, non_blocking=True)
            members_logits = logits.index_select(0, members)
        up = upsample_masks(members_logits, size, chunk_elements)  # [m, H, W] bool
        if mask_format == "rle":
            from rfdetr_core.mask_rle import encode_masks

            encoded = encode_masks(up)
            offset = 0
            for i in images:
                results[i]["rles"] = encoded[offset : offset + counts[i]]
                offset += counts[i]
        else:
            split = torch.split(up, [counts[i] for i in images])
            for i, part in zip(images, split, strict=True):
                results[i]["masks"] = part
    return results


def postprocess(
    outputs: Mapping[str, torch.Tensor],
    source_sizes: Sequence[tuple[int, int]] | torch.Tensor,
    num_select: int,
    threshold: float | None = None,
    valid_slots: torch.Tensor | None = None,
    with_masks: bool = True,
    chunk_elements: int | None = None,
    mask_format: str = "bool",
    host: bool = False,
    batched: bool | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Both halves in one call on the eval output dict, reporting slots (not category ids) and queries.

    Args:
        outputs: ``pred_logits [B, Q, S]``, ``pred_boxes [B, Q, 4]`` (normalised cxcywh) and optionally
            ``pred_masks [B, Q, h, w]`` (logits).
        source_sizes: ``B`` pairs (height, width) of the source images (a list or a ``[B, 2]`` tensor).
        num_select: (query, slot) pairs kept per image before thresholding (upstream: ``num_queries``).
        threshold: keep only ``score > threshold`` (strict, as upstream); ``None`` keeps all ``num_select``.
        valid_slots: optional ``[S]`` bool; detections whose slot is False are dropped (before masks).
        with_masks: compute masks when the outputs have them.
        chunk_elements: mask upsampling chunk budget (see :func:`upsample_masks`).
        mask_format: ``"bool"`` -> ``masks [N, H, W]`` bool on the outputs' device; ``"rle"`` -> ``rles``, N
            COCO RLE dicts encoded on that device (:func:`rfdetr_core.mask_rle.encode_masks`).
        host: return ``scores``, ``labels``, ``queries`` and ``boxes`` on the CPU (one copy for the batch).
        batched: the whole-batch implementation (default: on CUDA devices) or the per-image one.

    Returns:
        One dict per image, rows in descending score order: ``scores [N]``, ``labels [N]`` (slots, int64),
        ``queries [N]`` (int64), ``boxes [N, 4]`` xyxy source pixels, and ``masks [N, H, W]`` bool at the
        source size (or ``rles``) when masks were computed.
    """
    if mask_format not in ("bool", "rle"):
        raise ValueError(f"mask_format must be 'bool' or 'rle', got {mask_format!r}")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    masks = outputs.get("pred_masks") if with_masks else None
    batch, _, num_slots = logits.shape
    sizes, _ = _as_size_tensor(source_sizes, batch, logits.device)
    table = torch.arange(num_slots, device=logits.device)  # label = slot
    if valid_slots is not None:
        table = torch.where(valid_slots.to(logits.device), table, -1)
    scores, labels, picked, picked_masks, queries = _select(logits, boxes, masks, table, num_select)
    per_image = finish_detections(
        scores,
        labels,
        picked,
        picked_masks,
        sizes,
        threshold=threshold,
        mask_format=mask_format if masks is not None else "none",
        host=host,
        batched=batched,
        chunk_elements=chunk_elements,
    )
    queries_host = queries.cpu() if host else queries
    for i, res in enumerate(per_image):
        res["queries"] = queries_host[i, res.pop("index").to(queries_host.device)]
    return per_image
