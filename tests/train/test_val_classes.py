"""`rfdetr-train val` refuses to score a model on a dataset whose categories are other classes (naming the
ids and names) unless --allow-class-mismatch; without --data it says it uses the synthetic dataset."""

from __future__ import annotations

import json

import pytest

from rfdetr_core.checkpoint import save_model
from rfdetr_core.class_map import ClassMap
from rfdetr_core.coco_classes import coco_class_map
from rfdetr_core.factory import load_model
from rfdetr_core.preprocess import PreprocessConfig
from rfdetr_train.cli import main
from rfdetr_train.data.synthetic import generate
from rfdetr_train.evaluation.class_match import compare_classes

SHAPES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "triangle"}, {"id": 3, "name": "star"}]


def _weights(path, class_map):
    loaded = load_model("seg-tiny", class_map=class_map)
    card = loaded.card.replace(resolution=(64, 64), preprocess=PreprocessConfig())
    return save_model(path, loaded.model.state_dict(), card)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    shapes = _weights(root / "shapes.safetensors", ClassMap.from_coco_categories(SHAPES))
    coco80 = _weights(root / "coco.safetensors", coco_class_map(91))
    data = generate(root / "data", seed=1, sizes={"train": 1, "val": 2})
    other = root / "other"
    generate(other, seed=1, sizes={"train": 1, "val": 2})
    for split in ("train", "val"):
        coco = json.loads((other / f"{split}.json").read_text())
        coco["categories"] = [
            {"id": 1, "name": "person"},
            {"id": 2, "name": "bicycle"},
            {"id": 3, "name": "car"},
        ]
        (other / f"{split}.json").write_text(json.dumps(coco))
    return {"shapes": shapes, "coco80": coco80, "data": data, "other": other}


def _val(capsys, *args):
    code = main(["val", "--workers", "0", *map(str, args)])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


def test_other_classes_are_refused_with_their_ids_and_names(files, tmp_path, capsys):
    code, _, err = _val(capsys, "--weights", files["shapes"], "--data", files["other"], "--output", tmp_path)
    assert code == 1 and len(err.strip().splitlines()) <= 2
    assert "id 1 is 'circle' in the model but 'person' in the dataset" in err
    assert "id 3 is 'star' in the model but 'car' in the dataset" in err and "--allow-class-mismatch" in err
    assert not (tmp_path / "metrics.json").exists()

    code, out, _ = _val(capsys, "--weights", files["shapes"], "--data", files["other"], "--output", tmp_path,
                        "--allow-class-mismatch")  # fmt: skip
    assert code == 0 and "warning: --allow-class-mismatch: scoring anyway although id 1 is 'circle'" in out
    assert (tmp_path / "metrics.json").is_file()


def test_without_data_the_synthetic_set_is_named_and_checked(files, tmp_path, capsys, monkeypatch):
    from rfdetr_train.data import synthetic

    # a small built-in set in a home of its own (the session's full-size one stays as it is)
    monkeypatch.setenv("RFDETR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(synthetic, "SPLIT_SIZES", {"train": 1, "val": 2, "test": 1})
    code, _, err = _val(capsys, "--weights", files["coco80"], "--output", tmp_path)
    assert code == 1 and "the built-in synthetic dataset (circle, triangle, star; no --data given)" in err
    assert "id 1 is 'person' in the model but 'circle' in the dataset" in err

    code, out, _ = _val(capsys, "--weights", files["shapes"], "--output", tmp_path / "ok")
    assert code == 0 and "No --data given: validating on the built-in synthetic dataset at" in out


def test_compare_classes_rules():
    model = ClassMap.from_coco_categories([*SHAPES, {"id": 7, "name": "moon"}])
    same = ClassMap.from_coco_categories([{"id": 1, "name": " Circle"}, {"id": 3, "name": "STAR"}])
    assert not compare_classes(model, same)  # a subset, names without case and outer spaces: fine
    m = compare_classes(model, ClassMap.from_coco_categories([*SHAPES[:2], {"id": 4, "name": "moon"}]))
    assert m.missing == ((4, "moon"),) and m.renamed == ()
    assert "the model has no class for dataset id(s) 4 ('moon')" in m.describe()
