"""``rfdetr-train eval``: self-results give AP 1.0, JSON output, clear errors naming the first bad entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rfdetr_train.cli import main

mask_utils = pytest.importorskip("pycocotools.mask")


def _gt():
    images = [{"id": i, "height": 60, "width": 80, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    anns, k = [], 1
    for img in (1, 2):
        for j in range(3):
            x, y = 5 + 20 * j, 10 + 5 * img
            poly = [x, y, x + 15, y, x + 15, y + 25, x, y + 25]
            anns.append(
                {
                    "id": k,
                    "image_id": img,
                    "category_id": 1 + j % 2,
                    "bbox": [x, y, 15, 25],
                    "area": 375.0,
                    "iscrowd": 0,
                    "segmentation": [poly],
                }
            )
            k += 1
    cats = [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}, {"id": 3, "name": "plum"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _self_results(gt):
    out = []
    for a in gt["annotations"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], 60, 80))
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": a["bbox"],
                "score": 1.0,
                "segmentation": {"size": [60, 80], "counts": rle["counts"].decode()},
            }
        )
    return out


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def test_self_results_give_ap_one(tmp_path, capsys):
    gt = _gt()
    g = _write(tmp_path, "gt.json", gt)
    r = _write(tmp_path, "res.json", _self_results(gt))
    out = tmp_path / "m.json"
    assert main(["eval", "--gt", g, "--pred", r, "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"bbox", "segm", "boundary"}
    for kind in metrics:
        assert metrics[kind]["AP"] == 1.0 and metrics[kind]["AR100"] == 1.0
    text = capsys.readouterr().out
    assert "per class (segm)" in text and "apple" in text and "plum" not in text  # plum: nothing to show

    # box-only results, --max-dets and --no-boundary
    boxes = [{k: v for k, v in d.items() if k != "segmentation"} for d in _self_results(gt)]
    r2 = _write(tmp_path, "boxes.json", boxes)
    assert main(["eval", "--gt", g, "--pred", r2, "--json", str(out), "--max-dets", "20"]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AR20"] == 1.0
    assert (
        main(["eval", "--gt", g, "--pred", r, "--json", str(out), "--no-boundary", "--iou-type", "segm"]) == 0
    )
    assert set(json.loads(out.read_text())) == {"segm"}


def test_worse_results_lower_ap(tmp_path):
    gt = _gt()
    res = _self_results(gt)
    res[0]["category_id"] = 2  # one wrong class
    res[1]["bbox"] = [0, 0, 5, 5]  # one misplaced box
    g, r = _write(tmp_path, "gt.json", gt), _write(tmp_path, "res.json", res)
    out = tmp_path / "m.json"
    assert main(["eval", "--gt", g, "--pred", r, "--json", str(out), "--iou-type", "bbox"]) == 0
    assert 0.3 < json.loads(out.read_text())["bbox"]["AP"] < 1.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda res: res[2].update(image_id=77), "entry 2 .*image id 77 is not in the ground truth"),
        (lambda res: res[1].update(category_id=9), "entry 1 .*category id 9"),
        (lambda res: res[3]["segmentation"].update(counts="P\x7f1"), "entry 3 .*not an RLE digit"),
        (lambda res: res[3]["segmentation"].update(counts="P\u00e91"), "entry 3 .*not an RLE digit"),
        (lambda res: res[0]["segmentation"].update(counts="P3"), "entry 0 .*add up to h\\*w = 4800"),
        (lambda res: res[4]["segmentation"].update(size=[10, 10]), "entry 4 .*differs from the image size"),
        (lambda res: res[5].update(score="high"), "entry 5 .*'score' must be a finite number"),
        (lambda res: res[1].update(bbox=[1, 2, 3]), "entry 1 .*'bbox' must be"),
        (lambda res: res[2].pop("segmentation"), "entry 2 .*every detection has a 'segmentation'"),
    ],
)
def test_malformed_results_name_the_first_bad_entry(tmp_path, capsys, mutate, message):
    gt = _gt()
    res = _self_results(gt)
    mutate(res)
    g, r = _write(tmp_path, "gt.json", gt), _write(tmp_path, "res.json", res)
    assert main(["eval", "--gt", g, "--pred", r]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rfdetr-train eval: error:") and "Traceback" not in err
    import re

    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("gt_text", "res_text", "message"),
    [
        (None, "", "is empty"),
        (None, "[]", "holds no detections"),
        (None, "{not json", "not valid JSON"),
        ("", "[]", "Ground-truth file .* is empty"),
        ('{"images": []}', "[]", "not a COCO annotation file"),
    ],
)
def test_empty_and_broken_files(tmp_path, capsys, gt_text, res_text, message):
    g = _write(tmp_path, "gt.json", gt_text if gt_text is not None else _gt())
    r = _write(tmp_path, "res.json", res_text)
    assert main(["eval", "--gt", g, "--pred", r]) == 1
    import re

    assert re.search(message, capsys.readouterr().err)
    assert main(["eval", "--gt", str(tmp_path / "missing.json"), "--pred", r]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_rle_string_decoder_matches_pycocotools():
    from rfdetr_core.mask_rle import decode_counts as decode_rle_string

    rng = np.random.default_rng(0)
    m = rng.random((37, 23)) > 0.6
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    runs = decode_rle_string(rle["counts"].decode())
    flat = np.concatenate([np.full(n, i % 2, dtype=np.uint8) for i, n in enumerate(runs)])
    np.testing.assert_array_equal(flat.reshape(23, 37).T, m)
    # long runs (multi-group numbers), negative differences, and a mask starting with a one
    big = np.zeros((600, 700), dtype=np.uint8)
    big[:, :5] = 1
    big[100:500, 300:650] = 1
    big[590:, 690:] = 1
    r = mask_utils.encode(np.asfortranarray(big))
    runs = decode_rle_string(r["counts"].decode())
    assert runs[0] == 0 and runs.sum() == 600 * 700
    flat = np.concatenate([np.full(n, i % 2, dtype=np.uint8) for i, n in enumerate(runs)])
    np.testing.assert_array_equal(flat.reshape(700, 600).T, big)
    with pytest.raises(ValueError, match="ends inside"):
        decode_rle_string("0o")
