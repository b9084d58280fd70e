"""A validation split without annotations (negative images): training validates it (every metric -1, as
pycocotools gives, and said so) instead of crashing at its first validation, and `val` scores it too."""

from __future__ import annotations

import json

import pytest
import torch

from rfdetr_train.cli import main
from rfdetr_train.data.synthetic import generate


@pytest.mark.slow  # one training step, one validation and a val run of seg-tiny (about 1 min on 2 cores)
def test_training_and_val_on_a_split_without_annotations(tmp_path, capsys):
    import rfdetr_train

    data = generate(tmp_path / "data", seed=3, sizes={"train": 2, "val": 2})
    val = json.loads((data / "val.json").read_text())
    (data / "val.json").write_text(json.dumps({**val, "annotations": []}))
    torch.set_num_threads(1)
    result = rfdetr_train.train(
        data=str(data), model="seg-tiny", output=str(tmp_path / "runs"), steps=1, batch_size=2, resolution=64, workers=0,
        steps_per_validation=1, progress=False, plots=True, gallery_images=1,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert result.stopped == "completed" and result.last_weights.is_file()
    assert "No ground-truth objects in these 2 images" in out
    metrics = json.loads((result.run_dir / "metrics.json").read_text())["last"]
    assert metrics["segm"]["AP"] == -1.0 and metrics["bbox"]["AR100"] == -1.0

    code = main(["val", "--weights", str(result.last_weights), "--data", str(data), "--workers", "0",
                 "--output", str(tmp_path / "v")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "every AP and AR is -1" in out
