"""`rfdetr-train check`: one small broken dataset per error and warning, the exit code, a message naming
the problem (file, image or annotation id, fix) and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rfdetr_train import cli

H, W = 40, 50


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _base(n_images=2, per_image=6) -> dict:
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": W, "height": H})
        for j in range(per_image):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1,
                         "segmentation": [_rect(2 + 7 * j, 5, 6 + 7 * j, 20)], "bbox": [2 + 7 * j, 5, 4, 15], "iscrowd": 0})  # fmt: skip
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def _write_ds(root: Path, train: dict, val: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    val = _base() if val is None else val
    for coco in (train, val):
        for im in coco.get("images", []):
            if isinstance(im, dict) and "file_name" in im and not (root / im["file_name"]).exists():
                Image.new("RGB", (W, H), (90, 90, 90)).save(root / im["file_name"])
    (root / "train.json").write_text(json.dumps(train))
    (root / "val.json").write_text(json.dumps(val))
    return root


@pytest.fixture
def run(capsys):
    def go(path, *extra):
        rc = cli.main(["check", str(path), *extra])
        out = capsys.readouterr()
        text = out.out + out.err
        assert "Traceback" not in text
        return rc, text

    return go


def test_clean_dataset_passes(tmp_path, run):
    rc, text = run(_write_ds(tmp_path, _base()))
    assert rc == 0 and "0 error(s), 0 warning(s)" in text and "Total:   4 images, 24 instances" in text


def _broken(tmp_path, mutate, val=None):
    train = _base()
    mutate(train)
    return _write_ds(tmp_path, train, val)


def _set(path_keys, value):
    def mutate(coco):
        obj = coco
        for k in path_keys[:-1]:
            obj = obj[k]
        obj[path_keys[-1]] = value

    return mutate


ERRORS = {
    "missing-key": (
        "missing-key",
        lambda c: c["annotations"][3].pop("category_id"),
        ["annotation #3 (id 4)", "category_id"],
    ),
    "missing-key-image": (
        "missing-key",
        lambda c: c["images"][0].pop("height"),
        ["image #0 (id 1)", "height"],
    ),
    "duplicate-id": ("duplicate-id", _set(["annotations", 5, "id"], 1), ["annotation id 1 is used twice"]),
    "duplicate-image-id": ("duplicate-id", _set(["images", 1, "id"], 1), ["image id 1 is used twice"]),
    "unknown-image": (
        "unknown-image",
        _set(["annotations", 2, "image_id"], 99),
        ["annotation id 3", "image 99"],
    ),
    "unknown-category": (
        "unknown-category",
        _set(["annotations", 2, "category_id"], 7),
        ["annotation id 3", "category 7"],
    ),
    "polygon-too-short": (
        "polygon-too-short",
        _set(["annotations", 0, "segmentation"], [[1, 1, 5, 5]]),
        ["annotation id 1", "2 point(s)"],
    ),
    "rle-invalid": (
        "rle-invalid",
        _set(["annotations", 0, "segmentation"], {"size": [H, W], "counts": "\x7f\x7f"}),
        ["annotation id 1", "does not decode"],
    ),
    "rle-wrong-size": (
        "rle-invalid",
        _set(["annotations", 0, "segmentation"], {"size": [H + 1, W], "counts": [5, 10, (H + 1) * W - 15]}),
        ["annotation id 1", f"[{H + 1}, {W}]"],
    ),
    "empty-mask": (
        "empty-mask",
        _set(["annotations", 0, "segmentation"], {"size": [H, W], "counts": [H * W]}),
        ["annotation id 1", "empty mask"],
    ),
    "out-of-bounds": (
        "out-of-bounds",
        _set(["annotations", 0, "segmentation"], [_rect(30, 5, W + 6, 20)]),
        ["annotation id 1", "outside the 50x40 image"],
    ),
    "out-of-bounds-box": (
        "out-of-bounds",
        _set(["annotations", 0, "bbox"], [-5, 5, 4, 15]),
        ["annotation id 1", "bbox"],
    ),
    "size-mismatch": (
        "size-mismatch",
        _set(["images", 0, "width"], W + 10),
        ["image id 1", "is 50x40", "says 60x40"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_each_error_exits_1_and_names_the_problem(tmp_path, run, case):
    code, mutate, needles = ERRORS[case]
    rc, text = run(_broken(tmp_path, mutate))
    assert rc == 1
    assert f"ERROR {code}:" in text
    assert "train.json" in text
    for needle in needles:
        assert needle in text, f"{needle!r} missing from:\n{text}"


def test_json_that_does_not_parse_gives_position(tmp_path, run):
    root = _write_ds(tmp_path, _base())
    (root / "train.json").write_text('{"images": [\n  {"id": 1,}\n]}')
    rc, text = run(root)
    assert rc == 1 and "ERROR json-parse" in text and "train.json:2:" in text


def test_missing_and_unreadable_image_files(tmp_path, run):
    root = _write_ds(tmp_path, _base())
    (root / "im0.png").unlink()
    (root / "im1.png").write_bytes(b"not an image")
    rc, text = run(root)
    assert rc == 1
    assert "ERROR image-missing" in text and "im0.png does not exist" in text and "image id 1" in text
    assert "ERROR image-unreadable" in text and "im1.png" in text and "image id 2" in text


def test_yolo_class_out_of_range(tmp_path, run):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "names.txt").write_text("a\nb\n")
    Image.new("RGB", (W, H)).save(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n5 0.1 0.1 0.5 0.1 0.5 0.5\n")
    rc, text = run(tmp_path)
    assert (
        rc == 1
        and "ERROR yolo-class-range" in text
        and "x.txt:2" in text
        and "class 5 is out of range" in text
    )


def test_skip_invalid_reports_what_training_drops(tmp_path, run):
    root = _broken(tmp_path, _set(["annotations", 0, "segmentation"], [[1, 1, 5, 5]]))
    rc, text = run(root, "--skip-invalid")
    assert rc == 0 and "training would drop 1" in text


# -- warnings: exit code 0 -------------------------------------------------------------------------
def test_small_overrun_is_a_clamped_warning(tmp_path, run):
    rc, text = run(_broken(tmp_path, _set(["annotations", 0, "segmentation"], [_rect(30, 5, W + 0.5, 20)])))
    assert rc == 0 and "WARNING clamped" in text and "first ids: [1]" in text


def test_classes_with_few_instances(tmp_path, run):
    def add_rare(coco):
        coco["categories"].append({"id": 2, "name": "rare"})
        coco["annotations"].append(
            {"id": 99, "image_id": 1, "category_id": 2, "segmentation": [_rect(1, 25, 9, 35)]}
        )

    val = _base()
    add_rare(val)
    rc, text = run(_broken(tmp_path, add_rare, val))
    assert rc == 0 and "WARNING few-instances" in text and "rare (1)" in text


def test_more_instances_than_queries(tmp_path, run):
    coco = _base(n_images=1, per_image=0)
    for k in range(101):
        x, y = (k % 12) * 4, (k // 12) * 4
        coco["annotations"].append(
            {"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(x, y, x + 3, y + 3)]}
        )
    rc, text = run(_write_ds(tmp_path, coco))
    assert rc == 0 and "WARNING too-many-instances" in text and "image 1 with 101" in text


def test_class_present_in_one_split_only(tmp_path, run):
    def add_class(coco):
        coco["categories"].append({"id": 2, "name": "only_here"})
        for k in range(12):
            coco["annotations"].append(
                {"id": 100 + k, "image_id": 2, "category_id": 2, "segmentation": [_rect(1, 25, 9, 35)]}
            )

    val = _base()
    val["categories"].append({"id": 2, "name": "only_here"})
    rc, text = run(_broken(tmp_path, add_class, val))
    assert rc == 0 and "WARNING single-split-class" in text and "only in the 'train' split: only_here" in text


def test_yolo_label_without_image_is_a_warning_not_counted(tmp_path, run):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "names.txt").write_text("a\n")
    Image.new("RGB", (W, H)).save(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    (tmp_path / "labels" / "ghost.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n" * 3)
    rc, text = run(tmp_path)
    assert rc == 0 and "WARNING yolo-label-without-image" in text and "ghost.txt" in text
    assert "Total:   1 images, 1 instances" in text


def test_json_report_and_real_entry_point_without_traceback(tmp_path):
    root = _broken(tmp_path, _set(["annotations", 2, "category_id"], 7))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "rfdetr_train", "check", str(root), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    report = json.loads(out.read_text())
    assert report["errors"][0]["code"] == "unknown-category" and report["errors"][0]["ann_id"] == 3
    assert report["totals"]["instances"] == 23
    proc = subprocess.run([sys.executable, "-m", "rfdetr_train", "check", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_split_without_annotations_is_a_warning(tmp_path, run):
    val = {**_base(), "annotations": []}
    rc, text = run(_write_ds(tmp_path, _base(), val))
    assert rc == 0 and "WARNING no-annotations" in text and "no annotations in this split (2 images)" in text
    assert "every AP and AR is -1" in text


def _boxes_only(coco: dict) -> dict:
    return {
        **coco,
        "annotations": [{k: v for k, v in a.items() if k != "segmentation"} for a in coco["annotations"]],
    }


@pytest.mark.parametrize("skip", [(), ("--skip-invalid",)])
def test_box_only_dataset_gets_one_no_masks_error(tmp_path, run, skip):
    rc, text = run(_write_ds(tmp_path, _boxes_only(_base()), _boxes_only(_base())), *skip)
    assert rc == 1 and "missing-key" not in text
    assert text.count("this dataset has no masks: none of its 24 annotations (train, val)") == 1
    assert "polygons or RLE masks" in text


def test_box_only_split_named_once(tmp_path, run):
    rc, text = run(_write_ds(tmp_path, _base(), _boxes_only(_base())))
    assert rc == 1 and "missing-key" not in text
    assert text.count("this dataset has no masks: none of the 12 annotations of this split") == 1
