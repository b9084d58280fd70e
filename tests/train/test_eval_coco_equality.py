"""The fast COCO backend equals pycocotools' COCOeval (every summary number to 1e-9, and the raw arrays).

Generated data covers crowd regions, empty images, images without predictions, categories without ground
truth, detections of unknown categories, score ties and more detections than the limit.
"""

from __future__ import annotations

import numpy as np
import pytest

from rfdetr_core.mask_rle import rle_area
from rfdetr_train.evaluation.boundary import boundary_rles_for
from rfdetr_train.evaluation.coco_matching import evaluate_coco
from rfdetr_train.evaluation.coco_reference import evaluate_coco_reference
from rfdetr_train.evaluation.coco_sets import DetectionSet, GroundTruthSet

mask_utils = pytest.importorskip("pycocotools.mask")


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0


def _encode(m):
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def make_dataset(seed: int, n_img: int = 24, h: int = 96, w: int = 128, dets_per_img: int = 30):
    """A COCO dict and a DetectionSet with the awkward cases COCO evaluation must get right."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 4, 7, 9)]  # sparse ids; 9 never has ground truth
    images, anns = [], []
    gt_masks = {}
    ann_id = 1
    for i in range(n_img):
        img_id = 100 + 3 * i
        images.append({"id": img_id, "height": h, "width": w, "file_name": f"{img_id}.png"})
        n_obj = 0 if i % 7 == 3 else int(rng.integers(1, 7))  # some images have no objects at all
        for _ in range(n_obj):
            cat = int(rng.choice([1, 3, 4, 7]))
            cy, cx = rng.uniform(4, h - 4), rng.uniform(4, w - 4)
            m = _ellipse(h, w, cy, cx, rng.uniform(1, 40), rng.uniform(1, 50))
            crowd = int(rng.random() < 0.12)
            rle = _encode(m)
            x0, y0, bw, bh = mask_utils.toBbox(rle).tolist()
            seg = {"size": [h, w], "counts": rle["counts"].decode()}
            if not crowd and rng.random() < 0.5:  # polygons for some, as real datasets have
                seg = [[x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]]
                m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
            area = float(m.sum()) * (1.0 if rng.random() < 0.8 else rng.uniform(0.5, 2.0))
            anns.append(
                {
                    "id": ann_id,
                    "image_id": img_id,
                    "category_id": cat,
                    "bbox": [x0, y0, bw, bh],
                    "area": area,
                    "iscrowd": crowd,
                    "segmentation": seg,
                }
            )
            gt_masks[ann_id] = (img_id, cat, m, (x0, y0, bw, bh))
            ann_id += 1
    gt = {"images": images, "annotations": anns, "categories": cats}

    img_id, cat_id, score, boxes, rles = [], [], [], [], []
    objs = list(gt_masks.values())
    for i, im in enumerate(images):
        if i % 5 == 1:
            continue  # images without predictions
        n = dets_per_img + (95 if i % 6 == 0 else 0)  # some images exceed the 100-detection limit
        own = [o for o in objs if o[0] == im["id"]]
        for j in range(n):
            if own and j < 2 * len(own):  # jittered copies of the image's objects
                _, c, m, (x0, y0, bw, bh) = own[j % len(own)]
                c = c if rng.random() < 0.85 else int(rng.choice([1, 3, 4, 7, 9]))
                sy, sx = rng.integers(-2, 3, size=2)
                m = np.roll(m, (int(sy), int(sx)), axis=(0, 1))
                box = [x0 + sx + rng.normal(0, 1), y0 + sy + rng.normal(0, 1), bw * rng.uniform(0.8, 1.2), bh]
            else:
                c = int(rng.choice([1, 3, 4, 7, 9, 11]))  # 11: a category the dataset does not have
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
                m = _ellipse(h, w, cy, cx, rng.uniform(0.5, 30), rng.uniform(0.5, 30))
                box = [cx - 5, cy - 4, rng.uniform(1, 80), rng.uniform(1, 60)]
            img_id.append(im["id"])
            cat_id.append(c)
            score.append(round(float(rng.random()), 2))  # rounded: many exact score ties
            boxes.append(box)
            rles.append(_encode(m))
    dt = DetectionSet(
        image_id=np.array(img_id),
        category_id=np.array(cat_id),
        score=np.array(score, dtype=np.float64),
        bbox=np.array(boxes, dtype=np.float64),
        rles=rles,
        mask_area=rle_area(rles),
    )
    return gt, dt


def _assert_equal(ours, ref):
    if ref.max_dets[-1] != 100:
        # pycocotools' summarize() asks for maxDets=100 for stats[0] whatever maxDets is (so -1 here);
        # ours takes maxDets[-1] like its other AP stats: compare with the mean of its own precision.
        s = ref.precision[:, :, :, 0, -1]
        assert ref.stats[0] == -1.0
        ref.stats[0] = np.mean(s[s > -1])
    np.testing.assert_allclose(ours.stats, ref.stats, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.precision, ref.precision, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.recall, ref.recall, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.scores, ref.scores, rtol=0, atol=1e-12)
    # the same detections matched to the same ground truths at IoU 0.5
    a = sorted(zip(ours.matches.det_index.tolist(), ours.matches.matched_gt.tolist(), strict=True))
    b = sorted(zip(ref.matches.det_index.tolist(), ref.matches.matched_gt.tolist(), strict=True))
    assert a == b
    np.testing.assert_array_equal(ours.matches.num_gt, ref.matches.num_gt)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize(("seed", "max_dets"), [(0, 100), (1, 20), (2, 7)])
def test_fast_backend_equals_pycocotools(iou_type, seed, max_dets):
    gt_dict, dt = make_dataset(seed)
    gt = GroundTruthSet.from_coco(gt_dict)
    img_ids = [im["id"] for im in gt_dict["images"]]
    ours = evaluate_coco(gt, dt, iou_type, img_ids, max_dets=max_dets)
    ref = evaluate_coco_reference(gt, dt, iou_type, img_ids, max_dets=max_dets)
    _assert_equal(ours, ref)
    assert ours.stats[0] > 0.02  # the data is not degenerate: there is something to measure
    if seed == 0:
        assert (ours.stats[3:6] > -1).all()  # small, medium and large objects all present


def test_subset_of_images_and_boundary_equal_pycocotools():
    gt_dict, dt = make_dataset(3, n_img=16)
    gt = GroundTruthSet.from_coco(gt_dict)
    img_ids = [im["id"] for im in gt_dict["images"]][::2]  # validation on part of the dataset
    bound = boundary_rles_for(gt, dt, dilation_ratio=0.02)
    ours = evaluate_coco(gt, dt, "segm", img_ids, boundary_rles=bound)
    ref = evaluate_coco_reference(gt, dt, "segm", img_ids, boundary_rles=bound)
    _assert_equal(ours, ref)
    plain = evaluate_coco(gt, dt, "segm", img_ids)
    assert ours.stats[0] <= plain.stats[0] + 1e-12  # min(mask, boundary) IoU can only lower AP


def test_no_detections_at_all():
    gt_dict, _ = make_dataset(4, n_img=6)
    gt = GroundTruthSet.from_coco(gt_dict)
    img_ids = [im["id"] for im in gt_dict["images"]]
    for iou_type in ("bbox", "segm"):
        ours = evaluate_coco(gt, DetectionSet.empty(with_masks=True), iou_type, img_ids)
        assert np.all(ours.stats[ours.stats > -1] == 0.0)


def test_annotation_id_zero_is_matched():
    # pycocotools stores the matched ground truth's *id* and tests it for truth, so id 0 counts as missed;
    # ours matches it: renumbering the annotations from 0 must not change our numbers.
    gt_dict, dt = make_dataset(5, n_img=10)
    img_ids = [im["id"] for im in gt_dict["images"]]
    ref = evaluate_coco_reference(GroundTruthSet.from_coco(gt_dict), dt, "bbox", img_ids)
    shifted = {**gt_dict, "annotations": [{**a, "id": a["id"] - 1} for a in gt_dict["annotations"]]}
    ours = evaluate_coco(GroundTruthSet.from_coco(shifted), dt, "bbox", img_ids)
    np.testing.assert_allclose(ours.stats, ref.stats, rtol=0, atol=1e-9)


def test_matching_in_small_groups_gives_the_same_result(monkeypatch):
    from rfdetr_train.evaluation import coco_matching

    gt_dict, dt = make_dataset(6, n_img=12)
    gt = GroundTruthSet.from_coco(gt_dict)
    img_ids = [im["id"] for im in gt_dict["images"]]
    whole = evaluate_coco(gt, dt, "segm", img_ids)
    monkeypatch.setattr(coco_matching, "MATCH_GROUP", 3)
    grouped = evaluate_coco(gt, dt, "segm", img_ids)
    np.testing.assert_array_equal(whole.precision, grouped.precision)
    np.testing.assert_array_equal(whole.matches.matched_gt, grouped.matches.matched_gt)
