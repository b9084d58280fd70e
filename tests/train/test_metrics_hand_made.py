"""Hand-made cases: per-class best F1, the confusion matrix and Boundary AP, checked against numbers
worked out by hand (or by direct set arithmetic), not against our own code."""

from __future__ import annotations

import numpy as np
import pytest

from rfdetr_core.mask_rle import rle_area
from rfdetr_train.evaluation import Evaluator
from rfdetr_train.evaluation.boundary import boundary_width
from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet
from rfdetr_train.evaluation.confusion import confusion_matrix
from rfdetr_train.evaluation.per_class import best_f1, f1_confidence_curve

mask_utils = pytest.importorskip("pycocotools.mask")


def test_best_f1_by_hand():
    # cumulative at 0.9/0.8/0.7/0.6/0.5: F1 = .400/.333/.571/.750/.667 -> best 0.75 at 0.6 (P = R = 3/4)
    p, r, f1, conf = best_f1(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 1, 0], bool), 4)
    assert (p, r, f1, conf) == pytest.approx((0.75, 0.75, 0.75, 0.6))
    # tied scores are kept or dropped together: >= 0.9 gives P = R = .5, >= 0.5 gives P = 2/3, R = 1
    p, r, f1, conf = best_f1(np.array([0.9, 0.9, 0.5]), np.array([0, 1, 1], bool), 2)
    assert (p, r, f1, conf) == pytest.approx((2 / 3, 1.0, 0.8, 0.5))
    assert best_f1(np.array([]), np.array([], bool), 3)[:3] == (0.0, 0.0, 0.0)
    assert np.isnan(best_f1(np.array([0.4]), np.array([False]), 0)[1])  # recall undefined without GT
    curve = f1_confidence_curve(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 1, 0], bool), 4)
    assert (
        curve[60] == pytest.approx(0.75)
        and curve[91] == 0.0
        and curve[0] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    )


def _box_ann(i, cat, box, crowd=0):
    return {
        "id": i,
        "image_id": 1,
        "category_id": cat,
        "bbox": box,
        "area": box[2] * box[3],
        "iscrowd": crowd,
    }


def test_confusion_matrix_by_hand():
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    anns = [
        _box_ann(1, 1, [0, 0, 10, 10]),  # found as a
        _box_ann(2, 2, [20, 0, 10, 10]),  # found, but called a
        _box_ann(3, 3, [0, 30, 10, 10]),  # missed
        _box_ann(4, 1, [50, 50, 20, 20], crowd=1),  # crowd region
    ]
    gt = GroundTruthSet.from_coco(
        {"images": [{"id": 1, "height": 100, "width": 100}], "annotations": anns, "categories": cats}
    )
    dets = [  # (category, score, box)
        (1, 0.9, [0, 0, 10, 10]),
        (1, 0.8, [21, 0, 10, 10]),
        (2, 0.7, [80, 0, 10, 10]),  # nothing there: background
        (1, 0.6, [55, 55, 5, 5]),  # inside the crowd region: left out
        (2, 0.1, [0, 30, 10, 10]),  # below the threshold: not counted, so c stays missed
    ]
    dt = DetectionSet(
        image_id=np.ones(len(dets), np.int64),
        category_id=np.array([d[0] for d in dets]),
        score=np.array([d[1] for d in dets]),
        bbox=np.array([d[2] for d in dets], dtype=np.float64),
    )
    cm = confusion_matrix(gt, dt, "bbox", [1], [1, 2, 3], [0.5, 0.5, 0.5])
    expected = np.zeros((4, 4), np.int64)  # rows predicted a, b, c, background; columns true
    expected[0, 0] = 1  # a as a
    expected[0, 1] = 1  # b called a
    expected[1, 3] = 1  # b on background
    expected[3, 2] = 1  # c missed
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.to_csv().splitlines()[0] == "predicted \\ true,a,b,c,background"


def _square(h, w, y0, x0, size):
    m = np.zeros((h, w), dtype=bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def _ring(m, d):
    """Inner boundary by direct set arithmetic: pixels of m within Chebyshev distance d of a non-mask pixel."""
    h, w = m.shape
    pad = np.pad(m, d, constant_values=False)
    eroded = np.ones_like(m)
    for dy in range(-d, d + 1):
        for dx in range(-d, d + 1):
            eroded &= pad[d + dy : d + dy + h, d + dx : d + dx + w]
    return m & ~eroded


def test_boundary_ap_by_hand():
    h = w = 200
    d = boundary_width(h, w, 0.02)
    assert d == 6  # round(0.02 * 282.8)
    gt_m = _square(h, w, 50, 50, 100)
    pred_m = _square(h, w, 53, 53, 94)  # 3 px inside on every side
    mask_iou = pred_m.sum() / gt_m.sum()  # 8836 / 10000
    bg, bp = _ring(gt_m, d), _ring(pred_m, d)
    boundary_iou = (bg & bp).sum() / (bg | bp).sum()
    assert boundary_iou < 0.6 < mask_iou  # the edges are off although the masks overlap well

    enc = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in (gt_m, pred_m)]
    for r in enc:
        r["counts"] = r["counts"].decode()
    gt = {
        "images": [{"id": 7, "height": h, "width": w}],
        "categories": [{"id": 1, "name": "sq"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "bbox": [50, 50, 100, 100],
                "area": 10000.0,
                "iscrowd": 0,
                "segmentation": enc[0],
            }
        ],
    }
    ev = Evaluator(gt, boundary=True)
    rle = dict(enc[1], counts=enc[1]["counts"].encode())
    ev.add_detection_set(
        DetectionSet(
            np.array([7]),
            np.array([1]),
            np.array([0.9]),
            np.array([[53.0, 53, 94, 94]]),
            [rle],
            rle_area([rle]),
        ),
        [7],
    )
    rep = ev.compute()
    thr = np.linspace(0.5, 0.95, 10)
    # one detection, one object: AP at a threshold is 1 if the pair's IoU reaches it, else 0
    assert rep.metrics["segm"]["AP"] == pytest.approx(np.mean(mask_iou >= thr - 1e-12))
    assert rep.metrics["boundary"]["AP"] == pytest.approx(np.mean(min(mask_iou, boundary_iou) >= thr - 1e-12))
    assert rep.metrics["boundary"]["AP"] < rep.metrics["segm"]["AP"]
