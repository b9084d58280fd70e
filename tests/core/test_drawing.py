"""Drawn detections stay readable: line and font grow with the image, labels of touching boxes never overlap."""

from __future__ import annotations

import numpy as np

from rfdetr_core.detections import Detections
from rfdetr_core.drawing import _label_place, _overlaps, line_and_font_size


def _dets(boxes, size):
    n = len(boxes)
    return Detections(
        boxes=np.asarray(boxes, np.float32),
        scores=np.linspace(0.9, 0.5, n).astype(np.float32),
        category_ids=np.arange(1, n + 1),
        class_names=[f"thing{i}" for i in range(n)],
        masks=None,
        slots=np.arange(1, n + 1),
        image_size=size,
        source=None,
    )


def test_line_and_font_grow_with_the_image():
    small, large = line_and_font_size((480, 640)), line_and_font_size((2160, 3840))
    assert large[0] > small[0] and large[1] > small[1]
    assert large[1] >= 3 * small[1] * 0.9  # roughly proportional to the longer side
    assert line_and_font_size((20, 30)) == (1, 11)  # never below 1 px / 11 px


def test_labels_of_touching_boxes_do_not_overlap():
    # three boxes sharing their top edge, side by side and nested: labels must find free places
    boxes = [[100, 100, 900, 900], [900, 100, 1700, 900], [905, 100, 1700, 900], [910, 100, 1200, 400]]
    placed = []
    for box in boxes:
        rect = _label_place(box, (400, 60), (2160, 3840), placed)
        assert rect[0] >= 0 and rect[2] <= 3840 and rect[1] >= 0 and rect[3] <= 2160
        assert not any(_overlaps(rect, other) for other in placed)
        placed.append(rect)


def test_label_of_a_box_at_the_image_edge_stays_inside():
    rect = _label_place([3800, 0, 3840, 30], (400, 60), (2160, 3840), [])
    assert rect[2] <= 3840 and rect[1] >= 0


def test_plot_of_a_4k_image_draws_scaled_labels():
    dets = _dets([[100, 100, 900, 900], [900, 100, 1700, 900]], (2160, 3840))
    img = np.full((2160, 3840, 3), 200, np.uint8)
    out = np.asarray(dets.plot(img))
    line, font = line_and_font_size((2160, 3840))
    # the box outline is `line` px thick: the column just inside the left edge is drawn over
    assert (out[500, 100 : 100 + line] != 200).all()
    # a label band at least `font` px high sits above the first box
    band = (out[100 - font : 100, 100:300] != 200).any(axis=2).any(axis=1)
    assert band.sum() >= font * 0.8
