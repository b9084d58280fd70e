"""The built-in synthetic dataset: where it lives, generated once (atomically, under a lock), its fixed
difficulty, and that training falls back to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rfdetr_train.data import DataConfig, load_from_config
from rfdetr_train.data import synthetic as syn
from rfdetr_train.data.masks import decode, rasterize_polygons


def test_generated_once_under_rfdetr_home_and_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("RFDETR_HOME", str(tmp_path))
    folder = syn.synthetic_dataset_dir(seed=0)
    assert folder == tmp_path / "datasets" / f"synthetic-v{syn.GENERATOR_VERSION}-s0"
    assert {p.name for p in folder.iterdir()} == {"train.json", "val.json", "test.json", "images"}
    stamp = (folder / "train.json").stat().st_mtime_ns
    assert syn.synthetic_dataset_dir(seed=0) == folder and (folder / "train.json").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.name.startswith(".")], (
        "no temp folders left"
    )
    data = load_from_config(DataConfig())  # no --data: the synthetic dataset, checked like any other
    assert data.source.root == folder and not data.findings.errors
    assert data.class_map.names == list(syn.CLASSES)
    assert {k: len(v.coco["images"]) for k, v in data.splits.items()} == syn.SPLIT_SIZES
    # both encodings are used: polygons for whole objects, RLE for occluded ones
    kinds = {type(a["segmentation"]).__name__ for a in data.split("train").coco["annotations"]}
    assert kinds == {"list", "dict"}


def test_concurrent_processes_generate_it_once(tmp_path):
    # a small dataset keeps the test cheap; the lock and the rename are what is tested
    code = (
        "import rfdetr_train.data.synthetic as s; s.SPLIT_SIZES = {'train': 6, 'val': 2, 'test': 2}; "
        "print(s.synthetic_dataset_dir(seed=4))"
    )
    env = {**os.environ, "RFDETR_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    names = sorted(p.name for p in (tmp_path / "datasets").iterdir())
    assert names == [f"synthetic-v{syn.GENERATOR_VERSION}-s4", f"synthetic-v{syn.GENERATOR_VERSION}-s4.lock"]


@pytest.fixture(scope="module")
def rendered():
    rng = np.random.default_rng(123)
    return [syn._render(rng) for _ in range(60)]


def test_difficulty_objects_sizes_and_occlusion(rendered):
    counts = [len(objs) for _, objs in rendered]
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) >= 4
    classes = {c for _, objs in rendered for c, *_ in objs}
    assert classes == set(range(len(syn.CLASSES))) and len(classes) >= 3
    occluded = 0
    for img, objs in rendered:
        h, w = img.height, img.width
        assert min(h, w) >= 192 and max(h, w) <= 256
        for _cls, poly, visible, was_occluded in objs:
            full = rasterize_polygons([poly], h, w)
            extent = max(np.ptp(poly[:, 0]), np.ptp(poly[:, 1]))
            # the circumscribed size is 12-40% of the shorter side; rotated shapes span at least 75% of it
            assert 0.12 * 0.75 * min(h, w) <= extent <= 0.40 * min(h, w) + 1
            assert visible.sum() >= 0.30 * full.sum() - 2, "every object keeps >= 30% visible"
            occluded += was_occluded
    assert occluded >= 10, "occlusion actually happens"


def test_colour_does_not_tell_the_class(rendered):
    means: dict = {c: [] for c in range(len(syn.CLASSES))}
    for img, objs in rendered:
        arr = np.asarray(img, dtype=np.float32)
        for cls, _poly, visible, _ in objs:
            means[cls].append(arr[visible].mean(axis=0))
    allv = np.concatenate([np.stack(v) for v in means.values()])
    spread = allv.std(axis=0)
    for vals in means.values():
        assert (np.abs(np.stack(vals).mean(axis=0) - allv.mean(axis=0)) < 0.5 * spread).all()


def test_deterministic_and_validation_from_another_stream(tmp_path):
    a = syn.generate_split(tmp_path / "a", "train", seed=9, count=3)
    b = syn.generate_split(tmp_path / "b", "train", seed=9, count=3)
    v = syn.generate_split(tmp_path / "c", "val", seed=9, count=3)
    assert json.dumps(a["annotations"]) == json.dumps(b["annotations"])
    assert json.dumps(a["annotations"]) != json.dumps(v["annotations"])
    # stored masks decode to what was drawn: every annotation is non-empty and inside the image
    for ann in a["annotations"]:
        im = a["images"][ann["image_id"] - 1]
        assert decode(ann["segmentation"], im["height"], im["width"]).sum() == ann["area"] > 0


def test_command_writes_sample_data_that_the_documented_eval_example_scores_1(tmp_path):
    """README's evaluation example: sample data from the generator, results made from its own ground truth,
    `rfdetr-train eval` prints AP 1.0 (occluded objects are compressed RLE in the file: the script reads both)."""
    from pathlib import Path

    from rfdetr_train.cli import main as cli_main
    from rfdetr_train.data.synthetic import main

    out = tmp_path / "sample"
    assert main([str(out), "--train", "2", "--val", "3", "--test", "1"]) == 0
    assert len(json.loads((out / "val.json").read_text())["images"]) == 3
    with pytest.raises(SystemExit):  # never overwrites a dataset
        main([str(out)])
    script = Path(__file__).parents[2] / "scripts" / "coco_gt_as_results.py"
    res = tmp_path / "self.json"
    subprocess.run([sys.executable, str(script), str(out / "val.json"), str(res)], check=True)
    metrics = tmp_path / "m.json"
    assert cli_main(["eval", "--gt", str(out / "val.json"), "--pred", str(res), "--json", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["segm"]["AP"] == pytest.approx(1.0)
