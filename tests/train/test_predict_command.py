"""`rfdetr-train predict WEIGHTS IMAGES...`: drawn images, COCO results, clear errors; predict's own checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rfdetr_core import RFDETR, create_model
from rfdetr_core.checkpoint import save_checkpoint
from rfdetr_core.class_map import ClassMap
from rfdetr_core.preprocess import PreprocessConfig
from rfdetr_train.cli import main

RES = (64, 96)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("seg-tiny", num_classes=2)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    meta = {
        "variant": "seg-tiny",
        "resolution": list(RES),
        "class_map": ClassMap.from_names(["ant", "bee"], first_category_id=1).to_json(),
        "preprocess": PreprocessConfig().to_json(),
    }
    save_checkpoint(path, model.state_dict(), meta)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"000000000042.png": (50, 70), "000000000007.jpg": (90, 60)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_writes_drawn_images_and_coco_results(weights, images, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = main(["predict", str(weights), str(images), "--threshold", "0", "--json", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.jpg")) == ["000000000007.jpg", "000000000042.jpg"]
    assert Image.open(out / "000000000042.jpg").size == (70, 50)  # drawn at the source size
    results = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in results} == {7, 42}  # numeric stems become COCO image ids
    assert {r["category_id"] for r in results} <= {1, 2}
    assert all(r["segmentation"]["size"] in ([50, 70], [90, 60]) for r in results)
    printed = capsys.readouterr().out
    assert "000000000042.png:" in printed and "detection" in printed


def test_predict_results_equal_the_python_api(weights, images, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", str(weights), str(images / "000000000042.png"), "--json", "--no-draw",
                 "--threshold", "0.3", "--out", str(out)]) == 0
    results = json.loads((out / "predictions.json").read_text())
    dets = RFDETR.from_checkpoint(weights, device="cpu").predict(str(images / "000000000042.png"), 0.3)
    assert [round(r["score"], 5) for r in results] == [round(float(s), 5) for s in dets.scores]
    assert not list(out.glob("*.jpg"))


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "high"])
def test_predict_rejects_a_threshold_outside_0_1(weights, images, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(weights), str(images), "--threshold", bad])
    assert exc.value.code == 2
    assert "--threshold" in capsys.readouterr().err


def test_predict_missing_image_is_a_one_line_error(weights, tmp_path, capsys):
    rc = main(["predict", str(weights), str(tmp_path / "nope.jpg")])
    err = capsys.readouterr().err
    assert rc == 1 and "nope.jpg: no such file or folder" in err and "Traceback" not in err


def test_facade_threshold_and_float_range_checks(weights):
    model = RFDETR.from_checkpoint(weights, device="cpu")
    img = np.random.default_rng(1).random((40, 40, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"threshold must be a score in \[0, 1\]"):
        model.predict(img, threshold=50)
    with pytest.warns(UserWarning, match="Divide by 255"):
        model.predict(img * 255.0)


def test_a_folder_of_subfolders_names_the_subfolders_that_hold_images(weights, tmp_path, capsys):
    """Folders are not searched recursively (a dataset's images/train, images/val...): the error says so and
    names the subfolders with their image counts."""
    root = tmp_path / "images"
    for split, n in (("train", 2), ("val", 1)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(root / split / f"{i}.png")
    assert main(["predict", str(weights), str(root)]) == 1
    err = capsys.readouterr().err
    assert "no image files" in err and "Subfolders are not searched" in err
    assert f"{root / 'train'} (2)" in err and f"{root / 'val'} (1)" in err
