"""`rfdetr-train val --weights model.onnx` scores the exported file itself (through core's runner seam and
rfdetr-export's ONNX Runtime runner) and gives the numbers of `val` on the PyTorch weights; without the
runner or onnxruntime it says what to install."""

from __future__ import annotations

import json
import math
import sys

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rfdetr_train.cli import main as train_main
from rfdetr_train.data.synthetic import generate


def _pseudo_ground_truth(data, weights) -> None:
    """Replace the val split's objects by every second detection of the PyTorch model itself (boxes and
    masks of some size): a barely trained model scores AP 0 on the real shapes, and equal zeros would
    prove nothing; against its own detections, with its other detections as false positives in between,
    every summary number is somewhere between 0 and 1 and moves when any detection changes."""
    from rfdetr_core import RFDETR

    model = RFDETR.from_file(weights, device="cpu")
    coco = json.loads((data / "val.json").read_text())
    annotations = []
    for image in coco["images"]:
        dets = model.predict(str(data / image["file_name"]), threshold=0.0)
        kept = [d for d in dets.to_coco(image["id"])[::2] if min(d["bbox"][2:]) >= 2]
        for det in kept[:8]:
            from pycocotools import mask as mask_utils

            area = float(mask_utils.area(det["segmentation"]))
            if area >= 4:
                det.pop("score")
                annotations.append({**det, "id": len(annotations) + 1, "area": area, "iscrowd": 0})
    assert len(annotations) >= 2 * len(coco["images"]), annotations
    coco["annotations"] = annotations
    (data / "val.json").write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def trained_and_exported(tmp_path_factory):
    """seg-tiny trained 2 steps at 64 px on a small synthetic set, a val split of its own detections, and
    its ONNX export with K = 100 (all 90 query x class pairs, as PyTorch's val with max_dets 100 counts)."""
    import rfdetr_train
    from rfdetr_export.cli import main as export_main

    root = tmp_path_factory.mktemp("val_onnx")
    data = generate(root / "data", seed=3, sizes={"train": 2, "val": 3})
    result = rfdetr_train.train(
        data=str(data), model="seg-tiny", output=str(root / "runs"), steps=2, batch_size=2, resolution=64,
        workers=0, steps_per_validation=2, progress=False, plots=False, gallery_images=0,
    )  # fmt: skip
    weights = result.run_dir / "last.safetensors"
    _pseudo_ground_truth(data, weights)
    onnx_path = root / "last.onnx"
    code = export_main(
        [str(weights), "--onnx", "--dynamic-batch", "--num-select", "100", "--output", str(onnx_path)]
    )
    assert code == 0
    return data, weights, onnx_path


def _val(capsys, weights, data, out):
    code = train_main(["val", "--weights", str(weights), "--data", str(data), "--workers", "0", "--device", "cpu",
                       "--output", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads((out / "metrics.json").read_text())["last"], captured.out


def _numbers(metrics):
    return {
        f"{kind}/{name}": value
        for kind in ("bbox", "segm", "boundary")
        for name, value in metrics[kind].items()
    }


def test_val_of_the_onnx_file_equals_val_of_the_weights(trained_and_exported, tmp_path, capsys):
    data, weights, onnx_path = trained_and_exported
    want, _ = _val(capsys, weights, data, tmp_path / "torch")
    got, out = _val(capsys, onnx_path, data, tmp_path / "onnx")
    assert "last.onnx on val (3 images, run by onnxruntime)" in out and "warning" not in out
    want, got = _numbers(want), _numbers(got)
    assert set(got) == set(want) and len(want) >= 36  # 12 numbers of each of bbox, segm, boundary
    far = {k: (got[k], want[k]) for k in want if not math.isclose(got[k], want[k], abs_tol=1e-3)}
    assert not far, far
    # something to compare: numbers between 0 and 1 (the val split holds the model's own detections)
    assert 0.05 < want["segm/AP"] < 0.95 and 0.05 < want["bbox/AP50"] < 0.95, want


def test_an_exported_file_with_fewer_detections_than_max_dets_is_warned_about(
    trained_and_exported, capsys, monkeypatch
):
    import rfdetr_core.runner
    from rfdetr_export.runtime import OnnxRuntimeModel
    from rfdetr_train.engine.evaluate_weights import _exported_runner

    _, _, onnx_path = trained_and_exported
    runner = OnnxRuntimeModel(onnx_path)
    runner.card = runner.card.replace(num_select=10)  # as `rfdetr-export --num-select 10` records it
    monkeypatch.setattr(rfdetr_core.runner, "runner_from_file", lambda path, device=None: runner)
    assert _exported_runner("k10.onnx", "cpu", 100, main_process=True) is runner
    out = capsys.readouterr().out
    assert (
        "warning: k10.onnx keeps 10 detections per image (its --num-select) but the metrics count up to 100"
        in out
    )
    assert "export with --num-select 100, or validate both with --eval-max-dets 10" in out
    runner.card = runner.card.replace(num_select=100)  # 90 pairs: all a PyTorch val can count too
    _exported_runner("k100.onnx", "cpu", 100, main_process=True)
    assert "warning" not in capsys.readouterr().out


def test_without_a_runner_for_onnx_val_names_the_package(tmp_path, capsys, monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    (tmp_path / "model.onnx").write_bytes(b"")  # it exists: the suffix decides what is missing
    code = train_main(["val", "--weights", str(tmp_path / "model.onnx"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "No runner for .onnx files like model.onnx: pip install rfdetr-export[onnx]" in err


def test_without_onnxruntime_val_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    (tmp_path / "model.onnx").write_bytes(b"")  # it exists: the suffix decides what is missing
    code = train_main(["val", "--weights", str(tmp_path / "model.onnx"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "needs onnxruntime: pip install 'rfdetr-export[onnx]'" in err
