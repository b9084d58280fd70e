"""The confusion-matrix picture of a many-class dataset: only present classes, top N, nothing lost."""

from __future__ import annotations

import numpy as np
import pytest

from rfdetr_train.evaluation.confusion import ConfusionMatrix

pytest.importorskip("matplotlib")
from rfdetr_train.evaluation.plots import _reduced_matrix, confusion_classes, plot_confusion


def _matrix(num_classes: int, present: dict[int, int]) -> ConfusionMatrix:
    mat = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for k, count in present.items():
        mat[k, k] = count  # correct detections
        mat[num_classes, k] = 1  # one miss each
    names = [f"class{k}" for k in range(num_classes)]
    return ConfusionMatrix(mat, list(range(1, num_classes + 1)), names, 0.5, np.full(num_classes, 0.3))


def test_only_present_classes_are_drawn():
    cm = _matrix(80, {3: 5, 10: 2, 41: 7})
    assert confusion_classes(cm) == [3, 10, 41]
    mat, labels = _reduced_matrix(cm, confusion_classes(cm))
    assert labels == ["class3", "class10", "class41", "background"]
    assert mat.sum() == cm.matrix.sum()


def test_top_n_keeps_the_largest_and_sums_the_rest():
    cm = _matrix(80, {k: k + 1 for k in range(50)})
    keep = confusion_classes(cm, max_classes=10)
    assert keep == list(range(40, 50))
    mat, labels = _reduced_matrix(cm, keep)
    assert labels[-2:] == ["40 other classes", "background"]
    assert mat.shape == (12, 12)
    assert mat.sum() == cm.matrix.sum()  # every count stays in the picture


def test_plot_writes_a_png(tmp_path):
    cm = _matrix(80, {k: 3 for k in range(0, 80, 2)})
    out = plot_confusion(cm, tmp_path / "cm.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
