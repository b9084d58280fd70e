"""The end-of-run "AP50 over time" table printed from ``TrainResult.history``."""

from __future__ import annotations

from rfdetr_train.engine.api import history_table


def test_history_table_has_one_row_per_validation():
    history = [
        [400, 81.234, {"segm": {"AP50": 0.0123}, "bbox": {"AP50": 0.02}}],
        [800, 160.0, {"segm": {"AP50": 0.25}, "bbox": {"AP50": 0.3}}],
        [1000, 201.5, {"bbox": {"AP50": 0.5}}],  # detection runs have no segm metrics
    ]
    lines = history_table(history).splitlines()
    assert lines[0].startswith("AP50 over time")
    assert lines[1].split() == ["step", "seconds", "segm", "AP50", "bbox", "AP50"]
    assert lines[2].split() == ["400", "81.2", "0.012", "0.020"]
    assert lines[3].split() == ["800", "160.0", "0.250", "0.300"]
    assert lines[4].split() == ["1000", "201.5", "-", "0.500"]
