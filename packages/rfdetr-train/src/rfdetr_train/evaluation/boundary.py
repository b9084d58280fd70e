"""Boundary masks for Boundary AP (Cheng et al., "Boundary IoU", CVPR 2021).

A mask's boundary is the mask minus its erosion by a square of half-width ``d = round(ratio x image
diagonal)`` (at least 1; ratio 0.02 in the paper), with the outside of the image counting as background,
as in the authors' boundary-iou-api. Boundary AP uses, per detection/ground-truth pair,
``min(mask IoU, boundary IoU)``; see :mod:`~rfdetr_train.evaluation.coco_matching`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from rfdetr_core.mask_rle import compress_counts, crop_runs, runs_to_counts
from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet
from rfdetr_train.evaluation.morphology import inner_boundary


def boundary_width(height: int, width: int, ratio: float) -> int:
    """Erosion half-width in pixels: ``max(1, round(ratio * sqrt(h^2 + w^2)))``."""
    return max(1, int(round(ratio * math.hypot(height, width))))


def boundary_fn(d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The inner boundary of width ``d`` as the callback :func:`rfdetr_core.mask_rle.logits_to_rle` takes
    (``[N, h, w]`` bool -> ``[N, h, w]`` bool, outside counted as background)."""
    return functools.partial(inner_boundary, d=d)


def mask_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """``[H, W]`` bool mask -> its inner boundary of width ``d`` (``[H, W]`` bool)."""
    return inner_boundary(torch.from_numpy(np.ascontiguousarray(mask))[None], d)[0].numpy()


def boundary_rles(rles: list[dict], ratio: float) -> list[dict]:
    """Compressed RLE boundaries of compressed RLE masks (all of one image size or mixed).

    Each mask is eroded only inside its bounding box grown by one pixel: pixels outside are background,
    and the erosion of any pixel in the box already reaches that background ring when it should.
    """
    from pycocotools import mask as mask_utils

    out = []
    for rle in rles:
        h, w = (int(v) for v in rle["size"])
        d = boundary_width(h, w, ratio)
        x, y, bw, bh = mask_utils.toBbox(rle).tolist()
        if bw <= 0 or bh <= 0:
            out.append(compress_counts([[h * w]], h, w)[0])
            continue
        r0, c0 = max(int(y) - 1, 0), max(int(x) - 1, 0)
        r1, c1 = min(int(math.ceil(y + bh)) + 1, h), min(int(math.ceil(x + bw)) + 1, w)
        crop = mask_utils.decode(rle)[r0:r1, c0:c1].astype(bool)
        b = mask_boundary(crop, d)
        s_m, s_f, e_m, e_f = crop_runs(torch.from_numpy(b)[None], torch.tensor([r0]), torch.tensor([c0]), h)
        out.append(compress_counts([runs_to_counts(s_f, e_f, h * w)], h, w)[0])
    return out


def boundary_rles_for(
    gt: GroundTruthSet, dt: DetectionSet, dilation_ratio: float = 0.02, img_ids=None
) -> tuple[list, list]:
    """``(ground-truth boundaries, detection boundaries)`` in the row order of both sets.

    Ground-truth boundaries are computed once per set and ratio (cached on ``gt``), only for the images in
    ``img_ids`` (others get ``None``); detection boundaries computed with the masks are reused.
    """
    rles = gt.ensure_rles()
    rows = np.arange(len(rles)) if img_ids is None else np.flatnonzero(np.isin(gt.image_id, list(img_ids)))
    todo = [int(r) for r in rows if (dilation_ratio, int(r)) not in gt.boundaries]
    for r, b in zip(todo, boundary_rles([rles[r] for r in todo], dilation_ratio), strict=True):
        gt.boundaries[(dilation_ratio, r)] = b
    g = [gt.boundaries.get((dilation_ratio, r)) for r in range(len(rles))]
    d = dt.boundary_rles if dt.boundary_rles is not None else boundary_rles(dt.rles or [], dilation_ratio)
    return g, d
