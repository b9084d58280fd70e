"""Confusion matrix with a background row and column.

Per image, detections at or above their class's confidence threshold are matched to non-crowd ground truths
class-agnostically: pairs with IoU >= ``iou`` in descending IoU order, each detection and ground truth used
once. A matched pair counts at (predicted class, true class); an unmatched ground truth at (background,
true class); an unmatched detection at (predicted class, background), unless it overlaps a crowd region by
``iou`` or more (pycocotools' crowd IoU), in which case it is left out as COCO does.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet


@dataclass
class ConfusionMatrix:
    """``matrix [K+1, K+1]`` int64: rows = predicted class, columns = true class; index K = background."""

    matrix: np.ndarray
    category_ids: list[int]
    names: list[str]
    iou: float
    thresholds: np.ndarray  # [K] confidence per predicted class

    def to_csv(self) -> str:
        labels = [*self.names, "background"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["predicted \\ true", *labels])
        for i, name in enumerate(labels):
            w.writerow([name, *self.matrix[i].tolist()])
        return buf.getvalue()

    def write_csv(self, path: str | Path) -> None:
        from rfdetr_core.atomic_io import atomic_write_text

        atomic_write_text(Path(path), self.to_csv())


def confusion_matrix(
    gt: GroundTruthSet,
    dt: DetectionSet,
    iou_type: str,
    img_ids,
    cat_ids,
    thresholds,
    iou: float = 0.5,
) -> ConfusionMatrix:
    """Build the matrix over ``img_ids`` for categories ``cat_ids`` (``thresholds[k]`` for category k)."""
    from pycocotools import mask as mask_utils

    cat_ids = [int(c) for c in cat_ids]
    k_of = {c: i for i, c in enumerate(cat_ids)}
    num_k = len(cat_ids)
    thr = np.asarray(thresholds, dtype=np.float64)
    mat = np.zeros((num_k + 1, num_k + 1), dtype=np.int64)
    img_ids = set(int(i) for i in img_ids)

    g_k = np.array([k_of.get(int(c), -1) for c in gt.category_id], dtype=np.int64)
    d_k = np.array([k_of.get(int(c), -1) for c in dt.category_id], dtype=np.int64)
    d_keep = (d_k >= 0) & np.isin(dt.image_id, list(img_ids))
    d_keep[d_keep] &= dt.score[d_keep] >= thr[d_k[d_keep]]
    g_keep = (g_k >= 0) & np.isin(gt.image_id, list(img_ids))
    g_rles = gt.ensure_rles() if iou_type == "segm" else None

    def geo(rows, rles, boxes):
        return [rles[i] for i in rows] if iou_type == "segm" else boxes[rows]

    d_by_img = {i: np.flatnonzero(d_keep & (dt.image_id == i)) for i in np.unique(dt.image_id[d_keep])}
    for img in sorted(img_ids):
        g_rows = np.flatnonzero(g_keep & (gt.image_id == img))
        d_rows = d_by_img.get(img, np.zeros(0, np.int64))
        crowd = gt.iscrowd[g_rows]
        real, crowd_rows = g_rows[~crowd], g_rows[crowd]
        d_used = np.zeros(d_rows.size, bool)
        g_used = np.zeros(real.size, bool)
        if d_rows.size and real.size:
            ious = np.asarray(
                mask_utils.iou(geo(d_rows, dt.rles, dt.bbox), geo(real, g_rles, gt.bbox), [0] * real.size)
            ).reshape(d_rows.size, real.size)
            di, gi = np.nonzero(ious >= iou)
            for j in np.argsort(-ious[di, gi], kind="stable"):
                a, b = di[j], gi[j]
                if d_used[a] or g_used[b]:
                    continue
                d_used[a] = g_used[b] = True
                mat[d_k[d_rows[a]], g_k[real[b]]] += 1
        for b in np.flatnonzero(~g_used):
            mat[num_k, g_k[real[b]]] += 1
        left = d_rows[~d_used]
        if left.size and crowd_rows.size:
            c_iou = np.asarray(
                mask_utils.iou(
                    geo(left, dt.rles, dt.bbox), geo(crowd_rows, g_rles, gt.bbox), [1] * crowd_rows.size
                )
            ).reshape(left.size, crowd_rows.size)
            left = left[~(c_iou >= iou).any(axis=1)]
        for r in left:
            mat[d_k[r], num_k] += 1
    names = [gt.categories.get(c, str(c)) for c in cat_ids]
    return ConfusionMatrix(mat, cat_ids, names, iou, thr)
