"""Evaluator: model outputs -> COCO metrics; perfect predictions give 1.0; both backends agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import RFDETRError
from rfdetr_train.evaluation import EvalConfig, Evaluator

mask_utils = pytest.importorskip("pycocotools.mask")

SRC = [(120, 160), (90, 200), (100, 100)]  # source (h, w) of three images
GRID = (24, 24)  # mask-head grid (model input 96x96)
CATS = [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 12, "name": "bird"}]  # bird: no GT


def _scene(seed=0, num_queries=20):
    """Ground truth made *from* low-res mask logits, so that the matching outputs are exactly right."""
    g = torch.Generator().manual_seed(seed)
    images, anns, targets = [], [], []
    num_slots = 3
    logits = torch.full((len(SRC), num_queries, num_slots), -8.0)
    boxes = torch.rand(len(SRC), num_queries, 4, generator=g) * 0.3 + 0.2
    masks = torch.full((len(SRC), num_queries, *GRID), -6.0)
    ann_id = 1
    for i, (h, w) in enumerate(SRC):
        images.append({"id": 40 + i, "height": h, "width": w, "file_name": f"{i}.jpg"})
        for q in range(2 + i):
            slot = q % 2  # slots 0 and 1 = categories 5 and 9
            cy, cx = torch.randint(4, 20, (2,), generator=g).tolist()
            r = 2 + q
            yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
            masks[i, q] = 3.0 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r
            up = F.interpolate(masks[i, q][None, None], size=(h, w), mode="bilinear")[0, 0] > 0
            m = up.numpy()
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            boxes[i, q] = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
            logits[i, q, slot] = 6.0 - 0.1 * q
            anns.append(
                {
                    "id": ann_id,
                    "image_id": 40 + i,
                    "category_id": CATS[slot]["id"],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(m.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                }
            )
            ann_id += 1
        targets.append({"image_id": torch.tensor(40 + i), "orig_size": torch.tensor([h, w])})
    gt = {"images": images, "annotations": anns, "categories": CATS}
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}
    return gt, outputs, targets


def test_perfect_predictions_give_ap_one():
    gt, outputs, targets = _scene()
    cmap = ClassMap.from_coco_categories(CATS)  # slots 0, 1, 2 -> ids 5, 9, 12
    ev = Evaluator(gt, cmap, boundary=True)
    ev.update({k: v[:2] for k, v in outputs.items()}, targets[:2])
    ev.update({k: v[2:] for k, v in outputs.items()}, targets[2:])
    rep = ev.compute()
    assert set(rep.metrics) == {"bbox", "segm", "boundary"}
    for kind in ("bbox", "segm", "boundary"):
        m = rep.metrics[kind]
        assert m["AP"] == pytest.approx(1.0, abs=1e-12), (kind, m)
        assert m["AP50"] == m["AP75"] == 1.0
        assert m["AR100"] == 1.0
    rows = {r.name: r for r in rep.per_class["segm"]}
    assert rows["cat"].instances == 5 and rows["dog"].instances == 4 and rows["cat"].images == 3
    assert rows["cat"].f1 == 1.0 and pytest.approx(1.0) == rows["cat"].AP
    assert np.isnan(rows["bird"].AP) and rows["bird"].instances == 0
    cm = rep.confusion["segm"].matrix
    assert cm[0, 0] == 5 and cm[1, 1] == 4 and cm[:, 3].sum() == 0 and cm[3].sum() == 0  # no errors
    assert "maxDets=100" in rep.summary_text() and "cat" in rep.per_class_text()


def test_backends_agree_and_limit_applies():
    gt, outputs, targets = _scene(seed=1)
    outputs["pred_logits"] = outputs["pred_logits"] + torch.randn(outputs["pred_logits"].shape) * 4
    cmap = ClassMap.from_coco_categories(CATS)
    reps = {}
    for backend in ("fast", "pycocotools"):
        ev = Evaluator(gt, cmap, max_dets=15, backend=backend, boundary=True)
        ev.update(outputs, targets)
        reps[backend] = ev.compute()
    assert len(reps["fast"].detections) == 3 * 15  # top-15 of 20 queries x 3 slots per image
    for kind in ("bbox", "segm", "boundary"):
        a, b = reps["fast"].results[kind], reps["pycocotools"].results[kind]
        np.testing.assert_allclose(a.stats[1:], b.stats[1:], atol=1e-9)
        np.testing.assert_allclose(a.precision, b.precision, atol=1e-12)
        assert "AR15" in reps["fast"].metrics[kind]
    for kind in ("bbox", "segm"):
        for ra, rb in zip(reps["fast"].per_class[kind], reps["pycocotools"].per_class[kind], strict=True):
            assert ra == rb or (np.isnan(ra.AP) and np.isnan(rb.AP))


def test_slots_without_class_are_dropped_and_box_only_outputs():
    gt, outputs, targets = _scene()
    # slot 2 maps to no class: its (high-scoring) detections must not appear
    cmap = ClassMap.from_coco_categories(CATS[:2])
    cmap = ClassMap(cmap.entries, num_slots=3)
    outputs["pred_logits"][:, :, 2] = 9.0
    ev = Evaluator(gt, cmap)
    ev.update({k: v for k, v in outputs.items() if k != "pred_masks"}, targets)
    rep = ev.compute()
    assert set(rep.metrics) == {"bbox"}
    assert set(rep.detections.category_id.tolist()) <= {5, 9}
    assert rep.metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_from_config_and_errors():
    gt, outputs, targets = _scene()
    ev = Evaluator.from_config(
        gt, EvalConfig(max_dets=30), ClassMap.from_coco_categories(CATS), training=True
    )
    assert ev.max_dets == 30 and not ev.boundary
    assert Evaluator.from_config(gt, EvalConfig(), training=False).boundary  # val / eval: on by default
    with pytest.raises(RFDETRError, match="Nothing to evaluate"):
        ev.compute()
    bad = [dict(targets[0], image_id=torch.tensor(999))]
    ev.update({k: v[:1] for k, v in outputs.items()}, bad)
    with pytest.raises(RFDETRError, match="999"):
        ev.compute()
    ev.reset()
    wrong = [dict(targets[0], orig_size=torch.tensor([121, 160]))]
    with pytest.raises(RFDETRError, match="orig_size is 121x160"):
        ev.update({k: v[:1] for k, v in outputs.items()}, wrong)
    ev.reset()
    ev.update(outputs, targets)
    assert ev.compute().metrics["segm"]["AP"] == pytest.approx(1.0)


def test_gather_across_processes_counts_each_image_once(monkeypatch):
    """Two processes, the second also padded with image 40 (as distributed samplers do)."""
    gt, outputs, targets = _scene()
    cmap = ClassMap.from_coco_categories(CATS)
    parts = []
    for sel in ([0, 1], [2, 0]):
        ev = Evaluator(gt, cmap)
        ev.update({k: v[sel] for k, v in outputs.items()}, [targets[i] for i in sel])
        parts.append((ev._parts, ev._seen))

    import accelerate.utils

    class FakeAccelerator:
        num_processes = 2

    from rfdetr_train.evaluation.coco_sets import DetectionSet

    gathered = [(DetectionSet.concatenate(p), list(s)) for p, s in parts]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: gathered)
    ev = Evaluator(gt, cmap, accelerator=FakeAccelerator())
    ev._parts, ev._seen = parts[0]
    rep = ev.compute()
    assert rep.image_ids.tolist() == [40, 41, 42]
    assert len(rep.detections) == 3 * 60  # image 40 once, not twice
    assert rep.metrics["segm"]["AP"] == pytest.approx(1.0)
