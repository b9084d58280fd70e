"""A small gallery of validation images: ground truth (left) beside predictions (right)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rfdetr_core.atomic_io import atomic_path

TILE_WIDTH = 480
HEADER = 20  # pixels of the caption strip


def _detections(image_size, boxes_xywh, scores, cat_ids, names, rles):
    from pycocotools import mask as mask_utils

    from rfdetr_core.detections import Detections

    b = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4)
    xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    masks = None
    if rles is not None:
        masks = (
            np.stack([mask_utils.decode(r).astype(bool) for r in rles])
            if rles
            else np.zeros((0, *image_size), dtype=bool)
        )
    cat_ids = np.asarray(cat_ids, dtype=np.int64)
    return Detections(
        boxes=xyxy,
        scores=np.asarray(scores, dtype=np.float32),
        category_ids=cat_ids,
        class_names=[names.get(int(c), str(c)) for c in cat_ids],
        masks=masks,
        slots=cat_ids.copy(),
        image_size=tuple(image_size),
    )


def write_gallery(
    path: str | Path, report, load_image: Callable[[int], Any], count: int = 8, kind: str | None = None
) -> Path:
    """Draw the first ``count`` evaluated images; predictions at each class's best-F1 confidence.

    Args:
        report: an :class:`~rfdetr_train.evaluation.evaluator.EvalReport`.
        load_image: image id -> image (path, array, PIL) at its source size.
        kind: ``"segm"`` (masks drawn) or ``"bbox"``; default segm when evaluated.
    """
    from PIL import Image

    from rfdetr_core.drawing import draw_detections

    kind = kind or ("segm" if "segm" in report.per_class else "bbox")
    gt, dt = report.ground_truth, report.detections
    cm = report.confusion[kind]  # the confusion matrix's thresholds: best-F1 per class, else overall
    thr = dict(zip(cm.category_ids, cm.thresholds.tolist(), strict=True))
    names = gt.categories
    with_masks = kind == "segm"
    g_rles = gt.ensure_rles() if with_masks else None
    tiles = []
    for img_id in report.image_ids[:count].tolist():
        size = gt.image_sizes[img_id]
        g = np.flatnonzero(gt.image_id == img_id)
        d = np.flatnonzero(dt.image_id == img_id)
        d = d[[dt.score[i] >= thr.get(int(dt.category_id[i]), np.inf) for i in d]] if d.size else d
        left = _detections(
            size,
            gt.bbox[g],
            np.ones(g.size),
            gt.category_id[g],
            names,
            [g_rles[i] for i in g] if with_masks else None,
        )
        right = _detections(
            size,
            dt.bbox[d],
            dt.score[d],
            dt.category_id[d],
            names,
            [dt.rles[i] for i in d] if with_masks and dt.rles is not None else None,
        )
        image = load_image(img_id)
        pair = [
            draw_detections(image, left, show_labels=True),
            draw_detections(image, right, show_labels=True),
        ]
        scale = TILE_WIDTH / max(size[1], 1)
        th = max(1, round(size[0] * scale))
        tiles.append([p.resize((TILE_WIDTH, th)) for p in pair])
    if not tiles:
        raise ValueError("no images to draw")
    from PIL import ImageDraw

    height = sum(t[0].height for t in tiles)
    sheet = Image.new("RGB", (2 * TILE_WIDTH + 8, HEADER + height + 4 * (len(tiles) - 1)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 5), "ground truth", fill=(0, 0, 0))
    draw.text(
        (TILE_WIDTH + 14, 5), f"predictions ({kind}, score >= the class's best-F1 confidence)", fill=(0, 0, 0)
    )
    y = HEADER
    for a, b in tiles:
        sheet.paste(a, (0, y))
        sheet.paste(b, (TILE_WIDTH + 8, y))
        y += a.height + 4
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG", quality=88)
    return path
