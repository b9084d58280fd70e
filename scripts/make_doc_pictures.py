"""Regenerate the pictures in docs/pictures/ (no dataset or weights needed; runs from a fresh clone).

* ``confusion_matrix_80_classes.png``: the confusion plot of an 80-class (COCO names) validation in which 24
  classes occur, made from simulated detections (ground truth with box jitter, some misses, class confusions
  and false positives), to show how a many-class matrix reads.
* ``plot_large_image.png``: ``Detections.plot()`` on a 3840x2160 image (a mosaic of synthetic-dataset
  images with their own annotations as detections, many boxes touching), shown scaled to 1280 px wide as a
  viewer would show it.

    uv run python scripts/make_doc_pictures.py [--out docs/pictures]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def confusion_picture(out: Path) -> Path:
    from rfdetr_core.coco_classes import COCO_NAMES
    from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet
    from rfdetr_train.evaluation.confusion import confusion_matrix
    from rfdetr_train.evaluation.plots import plot_confusion

    rng = np.random.default_rng(0)
    names = list(COCO_NAMES)[:80]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    used = rng.choice(80, size=24, replace=False) + 1  # the classes this "dataset" has
    freq = 1.0 / np.arange(1, 25)  # a few common classes, a long tail
    images, anns, dets = [], [], []
    for img_id in range(1, 61):
        images.append({"id": img_id, "height": 480, "width": 640})
        for _ in range(int(rng.integers(1, 8))):
            cat = int(rng.choice(used, p=freq / freq.sum()))
            x, y = rng.uniform(0, 560), rng.uniform(0, 400)
            w, h = rng.uniform(20, 80), rng.uniform(20, 80)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            roll = rng.random()
            if roll < 0.12:
                continue  # missed
            pred = cat if roll < 0.82 else int(rng.choice(used))  # some confusions
            jit = rng.normal(0, 2, 4)
            dets.append((img_id, pred, rng.uniform(0.5, 1.0), [x + jit[0], y + jit[1], w + jit[2], h + jit[3]]))
        if rng.random() < 0.3:  # a false positive
            dets.append((img_id, int(rng.choice(used)), rng.uniform(0.5, 0.9), [300, 200, 40, 40]))
    gt = GroundTruthSet.from_coco({"images": images, "annotations": anns, "categories": cats})
    d = DetectionSet(
        np.array([r[0] for r in dets]), np.array([r[1] for r in dets]), np.array([r[2] for r in dets]),
        np.array([r[3] for r in dets], dtype=np.float64),
    )
    cm = confusion_matrix(gt, d, "bbox", [im["id"] for im in images], [c["id"] for c in cats],
                          np.full(80, 0.5))
    return plot_confusion(cm, out / "confusion_matrix_80_classes.png")


def large_plot_picture(out: Path, cols: int = 4, rows: int = 2) -> Path:
    from PIL import Image

    from rfdetr_core.detections import Detections
    from rfdetr_train.data.synthetic import CLASSES, _render

    rng = np.random.default_rng(3)
    tile_w, tile_h = 3840 // cols, 2160 // rows
    canvas = np.zeros((rows * tile_h, cols * tile_w, 3), np.uint8)
    masks, labels = [], []
    for r in range(rows):
        for c in range(cols):
            img, objects = _render(rng)
            scale_img = img.resize((tile_w, tile_h), Image.NEAREST)
            canvas[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w] = np.asarray(scale_img)
            for cls, _, visible, _ in objects:
                m = np.asarray(Image.fromarray(visible).resize((tile_w, tile_h), Image.NEAREST))
                full = np.zeros(canvas.shape[:2], bool)
                full[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w] = m
                masks.append(full)
                labels.append(cls)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    n = len(masks)
    dets = Detections(
        boxes=np.asarray(boxes, np.float32),
        scores=np.round(rng.uniform(0.5, 0.99, n), 2).astype(np.float32),
        category_ids=np.asarray(labels) + 1,
        class_names=[CLASSES[k] for k in labels],
        masks=np.stack(masks),
        slots=np.asarray(labels),
        image_size=canvas.shape[:2],
        source=None,
    )
    drawn = dets.plot(canvas)
    shown = drawn.resize((1280, round(1280 * drawn.height / drawn.width)), Image.LANCZOS)
    target = out / "plot_large_image.png"
    shown.save(target, optimize=True)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/pictures", help="folder for the PNG files")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (confusion_picture(out), large_plot_picture(out)):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
