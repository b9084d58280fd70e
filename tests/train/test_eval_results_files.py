"""``rfdetr-train eval`` on results files equals pycocotools itself (``COCO.loadRes`` + ``COCOeval``).

pycocotools takes a detection's area (the small / medium / large ranges) from its ``bbox`` (w * h) when the
file's *first* result has a non-empty ``bbox`` and from the mask otherwise, whatever the iouType. The
detections here carry boxes whose size differs from their masks, and objects of all three size ranges, so
any other convention changes APs/APm/APl and ARs/ARm/ARl. Training-time validation builds its own detection
set; it must equal pycocotools on the per-type results files it stands for.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from rfdetr_train.cli import main

mask_utils = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

H, W = 150, 200
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _ellipse(cy, cx, ry, rx):
    yy, xx = np.mgrid[0:H, 0:W]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _rle(m):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def _compressed(seg):
    return {"size": seg["size"], "counts": seg["counts"].encode()}


def _dataset(seed: int = 0):
    """Ground truth with small, medium and large objects, and results whose boxes are 0.5-1.8x the mask's
    box on each side (so a box area often falls in another size range than its mask area)."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in range(1, 9)]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    anns, results = [], []
    for im in images:
        for j in range(5):
            radius = (rng.uniform(2, 9), rng.uniform(10, 30), rng.uniform(45, 70))[j % 3]  # s / m / l
            cy, cx = rng.uniform(radius, H - radius), rng.uniform(radius, W - radius)
            m = _ellipse(cy, cx, radius * rng.uniform(0.7, 1.0), radius * rng.uniform(0.8, 1.3))
            seg = _rle(m)
            box = mask_utils.toBbox(_compressed(seg)).tolist()
            cat = int(rng.integers(1, 3))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": im["id"],
                    "category_id": cat,
                    "bbox": box,
                    "area": float(m.sum()),
                    "iscrowd": 0,
                    "segmentation": seg,
                }
            )
            for _ in range(2):  # a near copy and a shifted one, each with a resized box
                shift = rng.integers(-3, 4, size=2) if rng.random() < 0.7 else rng.integers(-25, 26, size=2)
                dm = np.roll(m, (int(shift[0]), int(shift[1])), axis=(0, 1))
                sx, sy = rng.uniform(0.5, 1.8, size=2)
                x, y, bw, bh = box
                dbox = [x + shift[1] - bw * (sx - 1) / 2, y + shift[0] - bh * (sy - 1) / 2, bw * sx, bh * sy]
                results.append(
                    {
                        "image_id": im["id"],
                        "category_id": cat if rng.random() < 0.9 else 3 - cat,
                        "bbox": [round(float(v), 2) for v in dbox],
                        "score": round(float(rng.random()), 3),
                        "segmentation": _rle(dm),
                    }
                )
    return {"images": images, "annotations": anns, "categories": cats}, results


def _pycocotools(gt_path, res_path, iou_type) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(res_path)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(KEYS, (float(v) for v in ev.stats), strict=True))


def _ours(tmp_path, gt_path, res_path) -> dict:
    out = tmp_path / "metrics.json"
    assert (
        main(["eval", "--gt", str(gt_path), "--pred", str(res_path), "--json", str(out), "--no-boundary"])
        == 0
    )
    return json.loads(out.read_text())


def _assert_same(ours: dict, ref: dict):
    for k in KEYS:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), (k, ours, ref)


@pytest.mark.parametrize("kind", ["bbox+segmentation", "segmentation", "bbox"])
def test_eval_equals_pycocotools_on_every_kind_of_results_file(tmp_path, capsys, kind):
    gt, results = _dataset()
    if kind == "segmentation":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    elif kind == "bbox":
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    ours = _ours(tmp_path, gt_path, res_path)
    note = "segm small/medium/large use the results' box areas" in capsys.readouterr().out
    assert note == (kind == "bbox+segmentation")  # said when it differs from validation's mask areas
    types = ("bbox",) if kind == "bbox" else ("bbox", "segm")
    assert set(ours) == set(types)
    for t in types:
        ref = _pycocotools(gt_path, res_path, t)
        assert min(ref["APs"], ref["APm"], ref["APl"]) > 0  # all three size ranges are measured
        _assert_same(ours[t], ref)


def test_box_area_and_mask_area_give_different_size_breakdowns(tmp_path):
    # what makes the test above able to fail: the two conventions disagree on this data
    gt, results = _dataset()
    gt_path, both, masks = tmp_path / "gt.json", tmp_path / "both.json", tmp_path / "masks.json"
    gt_path.write_text(json.dumps(gt))
    both.write_text(json.dumps(results))
    masks.write_text(json.dumps([{k: v for k, v in r.items() if k != "bbox"} for r in results]))
    for t in ("bbox", "segm"):
        a, b = _pycocotools(gt_path, both, t), _pycocotools(gt_path, masks, t)
        assert a["AP"] == b["AP"] or t == "bbox"  # segm IoUs do not use the box
        assert any(abs(a[k] - b[k]) > 1e-3 for k in ("APs", "APm", "APl"))


def test_validation_equals_pycocotools_on_the_results_it_stands_for(tmp_path):
    """The evaluator fed model outputs (training-time validation) takes box areas for bbox and mask areas
    for segm: pycocotools' numbers on a bbox-only and a segmentation-only results file of its detections."""
    from rfdetr_train.evaluation.evaluator import Evaluator

    gt, results = _dataset(1)
    gen = torch.Generator().manual_seed(0)
    q, k = 60, 3
    ev = Evaluator(gt, iou_types=("bbox", "segm"), max_dets=100)
    for im in gt["images"]:
        own = [r for r in results if r["image_id"] == im["id"]]
        logits = torch.full((1, q, k), -8.0)
        boxes = torch.rand(1, q, 4, generator=gen) * 0.5 + 0.25
        masks = torch.full((1, q, H // 2, W // 2), -5.0)
        for i, r in enumerate(own):
            logits[0, i, r["category_id"]] = torch.logit(torch.tensor(r["score"]).clamp(1e-3, 1 - 1e-3))
            x, y, bw, bh = r["bbox"]
            boxes[0, i] = torch.tensor([(x + bw / 2) / W, (y + bh / 2) / H, bw / W, bh / H])
            m = torch.from_numpy(mask_utils.decode(_compressed(r["segmentation"])))
            masks[0, i] = torch.nn.functional.avg_pool2d(m[None].float(), 2)[0] * 10 - 5
        ev.update(
            {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks},
            [{"image_id": im["id"], "orig_size": (H, W)}],
        )
    report = ev.compute()
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    for t in ("bbox", "segm"):
        res_path = tmp_path / f"{t}.json"
        # slot 0 is no category of the dataset: validation ignores it, and `eval` would refuse it
        kept = [r for r in report.detections.to_coco_results(t) if r["category_id"] in (1, 2)]
        res_path.write_text(json.dumps(kept))
        ref = _pycocotools(gt_path, res_path, t)
        assert min(ref["APs"], ref["APm"], ref["APl"]) > 0
        _assert_same(report.metrics[t], ref)
        _assert_same(_ours(tmp_path, gt_path, res_path)[t], ref)  # and `eval` on that file agrees


def test_ground_truth_without_annotations_gives_minus_one_like_pycocotools(tmp_path, capsys):
    # a split of negative images: pycocotools gives -1 for every stat; `eval` must too, and say why
    gt, results = _dataset()
    gt["annotations"] = []
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    ours = _ours(tmp_path, gt_path, res_path)
    assert "No ground-truth objects in these 8 images: every AP and AR is -1" in capsys.readouterr().out
    for t in ("bbox", "segm"):
        ref = _pycocotools(gt_path, res_path, t)
        assert set(ref.values()) == {-1.0}
        _assert_same(ours[t], ref)
