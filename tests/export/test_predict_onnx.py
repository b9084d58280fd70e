"""The public call: `RFDETR.from_file("model.onnx").predict(...)` returns the Detections of PyTorch's predict
on the same weights (same top K, scores within 1e-3, boxes within 0.5 px, mask IoU >= 0.99 per detection)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from PIL import Image

from rfdetr_core import RFDETR
from rfdetr_export.check import synthetic_images


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_from_file_onnx_predict_equals_pytorch_predict(export, tmp_path):
    done = export("seg-tiny", "--dynamic-batch")
    assert done.code == 0, done.stderr
    onnx_model = RFDETR.from_file(done.path)
    torch_model = RFDETR.from_file(done.checkpoint, device="cpu")
    assert onnx_model.runner.backend == "onnxruntime" and torch_model.runner.backend == "pytorch"
    assert (
        onnx_model.class_names == torch_model.class_names and onnx_model.resolution == torch_model.resolution
    )
    arrays = synthetic_images(3, size=(300, 410), seed=11)
    path = tmp_path / "first.png"
    Image.fromarray(arrays[0]).save(path)
    images = [str(path), arrays[1], Image.fromarray(arrays[2])]  # a path, an array, a PIL image
    for threshold in (0.0, 0.3):
        got = onnx_model.predict(images, threshold=threshold, batch_size=2)  # batches of 2 and 1
        want = torch_model.predict(images, threshold=threshold, batch_size=2)
        assert len(got) == len(want) == 3
        total = 0
        for g, w in zip(got, want, strict=True):
            assert g.image_size == w.image_size == (300, 410)
            assert len(g) == len(w)
            total += len(w)
            np.testing.assert_array_equal(g.category_ids, w.category_ids)
            assert g.class_names == w.class_names
            np.testing.assert_allclose(g.scores, w.scores, atol=1e-3, rtol=0)
            np.testing.assert_allclose(g.boxes, w.boxes, atol=0.5, rtol=0)
            assert g.masks.shape == w.masks.shape and g.masks.dtype == bool
            ious = [_mask_iou(a, b) for a, b in zip(g.masks, w.masks, strict=True)]
            assert min(ious, default=1.0) >= 0.99, min(ious)
        assert total > 0  # something to compare at both thresholds
