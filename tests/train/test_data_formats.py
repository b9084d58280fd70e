"""Dataset formats, mask encodings, id remapping, background, 16-bit and greyscale images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rfdetr_core.preprocess import load_image, resize_normalize
from rfdetr_train.data import DatasetError, ValTransform, load_dataset
from rfdetr_train.data.masks import decode

H, W = 48, 64


def _img(path: Path, value=128, mode="RGB", size=(W, H)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _mask_of_rect(x0, y0, x1, y1, h=H, w=W):
    return decode([_rect(x0, y0, x1, y1)], h, w)


def _coco(images, anns, cat_ids=(1, 2, 3)):
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids],
    }


def _write(path: Path, coco: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def _sample(data, split, i, size=(H, W)):
    return data.dataset(split, ValTransform(), size)[i]


def test_coco_file_polygons_multipart_rle_crowd_background(tmp_path):
    for n in ("a", "b", "bg"):
        _img(tmp_path / "imgs" / f"{n}.png")
    m_unc = _mask_of_rect(30, 5, 50, 20)
    unc = mask_utils.encode(np.asfortranarray(m_unc.astype(np.uint8)))
    # uncompressed RLE: run lengths in column-major order
    flat = m_unc.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], changes])).tolist()
    if sum(runs) != H * W:  # the sentinel adds one; trim to the image
        runs[-1] -= sum(runs) - H * W
    comp = mask_utils.encode(np.asfortranarray(_mask_of_rect(2, 30, 20, 45).astype(np.uint8)))
    coco = _coco(
        [
            {"id": 10, "file_name": "imgs/a.png", "width": W, "height": H},
            {"id": 20, "file_name": "imgs/b.png", "width": W, "height": H},
            {"id": 30, "file_name": "imgs/bg.png", "width": W, "height": H},
        ],
        [
            {"id": 1, "image_id": 10, "category_id": 7,
             "segmentation": [_rect(2, 2, 10, 10), _rect(20, 2, 28, 10)]},  # two parts, one object
            {"id": 2, "image_id": 10, "category_id": 11, "segmentation": {"size": [H, W], "counts": runs}},
            {"id": 3, "image_id": 20, "category_id": 3,
             "segmentation": {"size": [H, W], "counts": comp["counts"].decode()}},
            {"id": 4, "image_id": 20, "category_id": 3, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": unc["counts"].decode()}},
        ],
        cat_ids=(3, 7, 11),
    )  # fmt: skip
    data = load_dataset(_write(tmp_path / "ann.json", coco))
    assert data.class_map.category_ids == [3, 7, 11] and data.class_map.slot(7) == 1
    s = _sample(data, "train", 0)
    t = s["target"]
    assert t["labels"].tolist() == [1, 2] and t["image_id"] == 10
    two_parts = _mask_of_rect(2, 2, 10, 10) | _mask_of_rect(20, 2, 28, 10)
    assert torch.equal(t["masks"][0], torch.from_numpy(two_parts))
    assert torch.equal(t["masks"][1], torch.from_numpy(m_unc))
    # box = extent of the two parts: x 2..28, y 2..10 (pixel edges), normalised cxcywh
    ys, xs = np.nonzero(two_parts)
    expect = [(xs.min() + xs.max() + 1) / 2 / W, (ys.min() + ys.max() + 1) / 2 / H,
              (xs.max() + 1 - xs.min()) / W, (ys.max() + 1 - ys.min()) / H]  # fmt: skip
    assert torch.allclose(t["boxes"][0], torch.tensor(expect, dtype=torch.float32))
    t2 = _sample(data, "train", 1)["target"]
    assert t2["labels"].tolist() == [0], "the crowd annotation is not a training target"
    assert torch.equal(t2["masks"][0], torch.from_numpy(_mask_of_rect(2, 30, 20, 45)))
    bg = _sample(data, "train", 2)["target"]
    assert bg["masks"].shape == (0, H, W) and bg["boxes"].shape == (0, 4) and bg["labels"].numel() == 0
    gt = data.coco_gt("train")
    assert len(gt.getAnnIds()) == 4 and gt.loadAnns(4)[0]["iscrowd"] == 1 and len(gt.getImgIds()) == 3
    assert gt.loadAnns(1)[0]["area"] == int(two_parts.sum())


@pytest.mark.parametrize("cat_ids", [(0, 1, 2), (1, 2, 3), (5, 17, 90)], ids=["0-based", "1-based", "sparse"])
def test_category_ids_map_to_contiguous_training_ids(tmp_path, cat_ids):
    _img(tmp_path / "x.png")
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": c, "segmentation": [_rect(4 * i, 4, 4 * i + 3, 9)]}
        for i, c in enumerate(reversed(cat_ids))
    ]
    data = load_dataset(_write(tmp_path / "a.json", _coco([{"id": 1, "file_name": "x.png", "width": W, "height": H}], anns, cat_ids)))  # fmt: skip
    assert [data.class_map.category_id(s) for s in range(3)] == list(cat_ids)
    assert _sample(data, "train", 0)["target"]["labels"].tolist() == [2, 1, 0]


def _tiny_split(folder: Path, prefix="", n=2, cat=1):
    images, anns = [], []
    for i in range(n):
        _img(folder / f"{prefix}{i}.png")
        images.append({"id": i + 1, "file_name": f"{prefix}{i}.png", "width": W, "height": H})
        anns.append(
            {"id": i + 1, "image_id": i + 1, "category_id": cat, "segmentation": [_rect(5, 5, 20, 20)]}
        )
    return _coco(images, anns)


def test_folder_of_split_jsons_and_images_flag(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val", "test"):
        _write(root / f"{split}.json", _tiny_split(root, prefix=f"{split}_"))
    data = load_dataset(root)
    assert set(data.splits) == {"train", "val", "test"} and data.source.layout == "folder of split JSON files"
    # the JSON elsewhere, images given with --images
    _write(tmp_path / "anns" / "only.json", _tiny_split(tmp_path / "pics"))
    data = load_dataset(tmp_path / "anns" / "only.json", images=tmp_path / "pics")
    assert _sample(data, "train", 1)["target"]["labels"].tolist() == [0]


def test_roboflow_export(tmp_path):
    for sub in ("train", "valid", "test"):
        coco = _tiny_split(tmp_path / sub)
        # Roboflow's grouping category: id 0, the dataset name, supercategory of the real classes
        coco["categories"] = [{"id": 0, "name": "shapes", "supercategory": "none"},
                              {"id": 1, "name": "c1", "supercategory": "shapes"}]  # fmt: skip
        _write(tmp_path / sub / "_annotations.coco.json", coco)
    data = load_dataset(tmp_path)
    assert data.source.layout == "Roboflow COCO export" and set(data.splits) == {"train", "val", "test"}
    assert data.class_map.category_ids == [1] and data.class_map.names == ["c1"]
    assert any("only groups the other categories" in n for n in data.report()["notes"])
    assert len(data.dataset("val", ValTransform(), (H, W))) == 2


def test_explicit_annotation_files(tmp_path):
    _write(tmp_path / "t.json", _tiny_split(tmp_path / "im", prefix="t"))
    _write(tmp_path / "v.json", _tiny_split(tmp_path / "im", prefix="v", n=3))
    data = load_dataset(train_ann=tmp_path / "t.json", val_ann=tmp_path / "v.json", images=tmp_path / "im")
    assert len(data.split("train").coco["images"]) == 2 and len(data.split("val").coco["images"]) == 3
    with pytest.raises(DatasetError, match="no 'test' split"):
        data.split("test")


def _yolo_tree(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    (root / "names.txt").write_text("cat\ndog\n")
    for split, stems in (("train", ["a", "b", "bg"]), ("val", ["c"])):
        for s in stems:
            _img(root / "images" / split / f"{s}.jpg")
        lab = root / "labels" / split
        lab.mkdir(parents=True, exist_ok=True)
        for s in stems:
            if s != "bg":
                # a triangle of class 1, then a two-point line that is no polygon... is kept out below
                (lab / f"{s}.txt").write_text(
                    "1 0.1 0.1 0.5 0.1 0.5 0.6\n0 0.6 0.2 0.9 0.2 0.9 0.9 0.6 0.9\n"
                )
    (root / "labels" / "train" / "orphan.txt").write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")
    (root / "labels" / "train.cache").write_bytes(b"\x00junk")


def test_yolo_folder(tmp_path):
    _yolo_tree(tmp_path)
    data = load_dataset(tmp_path)
    assert data.source.layout.startswith("YOLO folder") and set(data.splits) == {"train", "val"}
    assert data.class_map.names == ["cat", "dog"] and data.class_map.category_ids == [0, 1]
    codes = [f.code for f in data.findings]
    assert codes.count("yolo-label-without-image") == 1  # orphan.txt: warned, not counted; *.cache ignored
    assert len(data.split("train").coco["annotations"]) == 4
    ds = data.dataset("train", ValTransform(), (H, W))
    t = ds[0]["target"]
    assert t["labels"].tolist() == [1, 0]
    tri = decode([[0.1 * W, 0.1 * H, 0.5 * W, 0.1 * H, 0.5 * W, 0.6 * H]], H, W)
    assert (t["masks"][0] == torch.from_numpy(tri)).float().mean() > 0.99
    assert ds[2]["target"]["labels"].numel() == 0, "an image without a label file is a background image"
    gt = data.coco_gt("val")  # in-memory COCO with area and bbox, for the evaluator
    ann = gt.loadAnns(gt.getAnnIds())[0]
    assert ann["category_id"] == 1 and ann["area"] > 0 and len(ann["bbox"]) == 4
    # names.txt as the path selects the same layout
    assert set(load_dataset(tmp_path / "names.txt").splits) == {"train", "val"}


def test_yolo_data_yaml(tmp_path):
    _yolo_tree(tmp_path / "ds")
    (tmp_path / "ds" / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n"
    )
    data = load_dataset(tmp_path / "ds" / "data.yaml")
    assert data.source.layout == "YOLO data.yaml" and data.class_map.names == ["cat", "dog"]
    assert len(data.split("val").coco["annotations"]) == 2


def test_16bit_and_greyscale_images_go_through_core_preprocess(tmp_path):
    grey16 = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 20).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    grey8 = (np.arange(H * W).reshape(H, W) % 251).astype(np.uint8)
    Image.fromarray(grey8, mode="L").save(tmp_path / "g8.png")
    coco = _coco(
        [{"id": 1, "file_name": "g16.png", "width": W, "height": H}, {"id": 2, "file_name": "g8.png", "width": W, "height": H}],
        [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(1, 1, 9, 9)]}],
    )  # fmt: skip
    data = load_dataset(_write(tmp_path / "a.json", coco))
    for i, name in enumerate(("g16.png", "g8.png")):
        img = _sample(data, "train", i, size=(24, 32))["image"]
        ref = resize_normalize(load_image(tmp_path / name)[0], (24, 32))[0]
        assert img.shape == (3, 24, 32) and torch.allclose(img, ref, atol=1e-5)
    # 16-bit keeps its range: the brightest pixel maps near 1.0 before normalisation, not clipped at 255
    raw = load_image(tmp_path / "g16.png")[0]
    assert abs(float(raw.max()) - grey16.max() / 65535) < 1e-6


def test_unknown_layout_and_missing_path(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(DatasetError, match="no dataset layout recognised.*found 2 .json"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope")


def test_errors_stop_loading_unless_skip_invalid(tmp_path):
    coco = _tiny_split(tmp_path, n=3)
    coco["annotations"][1]["segmentation"] = [[1, 2, 3, 4]]  # 2 points
    coco["images"][2]["file_name"] = "missing.png"
    path = _write(tmp_path / "a.json", coco)
    with pytest.raises(DatasetError, match="polygon-too-short|2 error"):
        load_dataset(path)
    data = load_dataset(path, skip_invalid=True)
    split = data.split("train")
    assert len(split.coco["images"]) == 2 and len(split.coco["annotations"]) == 1
    assert split.dropped_images == 1 and split.dropped_annotations == 2  # bad polygon + the missing image's
    assert sorted(f.code for f in data.findings.errors) == ["image-missing", "polygon-too-short"]


def test_large_jpeg_is_draft_decoded_and_stays_aligned(tmp_path):
    big_w, big_h = 1600, 1200
    arr = np.zeros((big_h, big_w, 3), np.uint8)
    arr[300:900, 400:1200] = (250, 20, 20)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    coco = _coco(
        [{"id": 1, "file_name": "big.jpg", "width": big_w, "height": big_h}],
        [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(400, 300, 1200, 900)]}],
    )
    data = load_dataset(_write(tmp_path / "a.json", coco))
    s = data.dataset("train", ValTransform(), (96, 128))[0]
    assert s["target"]["orig_size"].tolist() == [big_h, big_w] and s["image"].shape == (3, 96, 128)
    red = s["image"][0] > s["image"][1] + 2  # normalised red clearly above green
    m = s["target"]["masks"][0]
    assert (red & m).sum() / m.sum() > 0.95 and (red & ~m).sum() / red.sum() < 0.05


def test_only_splits_ignores_problems_in_splits_never_read(tmp_path):
    """`val --split test` must not refuse because train.json has a bad polygon or is not even JSON."""
    root = tmp_path / "ds"
    bad = _tiny_split(root, prefix="train_")
    bad["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    _write(root / "train.json", bad)
    (root / "val.json").write_text("{ not json")
    _write(root / "test.json", _tiny_split(root, prefix="test_"))
    with pytest.raises(DatasetError):
        load_dataset(root)
    data = load_dataset(root, only_splits=("test",))
    assert set(data.splits) == {"test"} and not data.findings.errors
    with pytest.raises(DatasetError, match="polygon"):
        load_dataset(root, only_splits=("train",))
    with pytest.raises(DatasetError, match=r"has no 'val' split \(found: train\)"):
        load_dataset(root / "train.json", only_splits=("val",))
