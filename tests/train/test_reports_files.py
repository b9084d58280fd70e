"""Report files of a validation: results.csv, metrics.json (last/best), per-class CSVs, plots, gallery."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from rfdetr_core.mask_rle import rle_area
from rfdetr_train.evaluation import Evaluator, append_results_row, write_validation_reports
from rfdetr_train.evaluation.coco_sets import DetectionSet

mask_utils = pytest.importorskip("pycocotools.mask")
pytest.importorskip("matplotlib")


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _report(shift: int):
    h, w = 40, 60
    images = [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i in (1, 2)]
    anns, rles, boxes, cats, imgs = [], [], [], [], []
    for i, (img, cat, x) in enumerate([(1, 1, 5), (1, 2, 30), (2, 1, 10)]):
        m = np.zeros((h, w), np.uint8)
        m[10:30, x : x + 20] = 1
        e = mask_utils.encode(np.asfortranarray(m))
        anns.append(
            {
                "id": i + 1,
                "image_id": img,
                "category_id": cat,
                "bbox": [x, 10, 20, 20],
                "area": 400.0,
                "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": e["counts"].decode()},
            }
        )
        p = np.zeros((h, w), np.uint8)
        p[10:30, x + shift : x + shift + 20] = 1
        rles.append(mask_utils.encode(np.asfortranarray(p)))
        boxes.append([x + shift, 10, 20, 20])
        cats.append(cat)
        imgs.append(img)
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "ant"}, {"id": 2, "name": "bee"}],
    }
    ev = Evaluator(gt)
    dt = DetectionSet(
        np.array(imgs),
        np.array(cats),
        np.array([0.9, 0.8, 0.7]),
        np.array(boxes, float),
        rles,
        rle_area(rles),
    )
    ev.add_detection_set(dt, [1, 2])
    return ev.compute()


def test_reports_written_and_best_tracked(tmp_path):
    worse, better = _report(shift=6), _report(shift=0)
    assert worse.metrics["segm"]["AP"] < better.metrics["segm"]["AP"] == pytest.approx(1.0)
    image = np.zeros((40, 60, 3), np.uint8)
    info = write_validation_reports(tmp_path, worse, {"step": 10, "epoch": 1}, load_image=lambda i: image)
    assert info["is_best"]
    info = write_validation_reports(tmp_path, better, {"step": 20, "epoch": 2}, plots=False)
    assert info["is_best"]
    info = write_validation_reports(tmp_path, worse, {"step": 30, "epoch": 3}, plots=False)
    assert not info["is_best"]

    names = {p.name for p in tmp_path.iterdir()}
    for f in [
        "results.csv",
        "metrics.json",
        "per_class_bbox.csv",
        "per_class_segm.csv",
        "confusion_matrix_bbox.csv",
        "confusion_matrix_segm.csv",
        "confusion_matrix_segm.png",
        "pr_curve_segm.png",
        "f1_curve_bbox.png",
        "val_gallery.jpg",
    ]:
        assert f in names, f
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes leave no temporaries

    rows = _rows(tmp_path / "results.csv")
    assert [r["step"] for r in rows] == ["10", "20", "30"]
    assert float(rows[1]["segm/AP"]) == pytest.approx(1.0) and "bbox/AR100" in rows[0]

    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["best"]["step"] == 20 and m["last"]["step"] == 30 and m["best_key"] == "segm/AP"
    assert set(m["last"]) >= {"bbox", "segm"} and m["best"]["segm"]["AP"] == pytest.approx(1.0)

    per_class = _rows(tmp_path / "per_class_segm.csv")
    assert [r["name"] for r in per_class] == ["ant", "bee"]
    assert per_class[0]["instances"] == "2" and float(per_class[0]["AP"]) < 1.0

    from PIL import Image

    assert Image.open(tmp_path / "val_gallery.jpg").size[0] > 900  # ground truth | predictions
    assert Image.open(tmp_path / "pr_curve_segm.png").format == "PNG"


def test_results_csv_grows_new_columns(tmp_path):
    append_results_row(tmp_path, {"step": 1, "bbox/AP": 0.5})
    append_results_row(tmp_path, {"step": 2, "bbox/AP": 0.6, "boundary/AP": 0.3})
    rows = _rows(tmp_path / "results.csv")
    assert rows[0]["boundary/AP"] == "" and rows[1]["boundary/AP"] == "0.3"
