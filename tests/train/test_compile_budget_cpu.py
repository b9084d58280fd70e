"""``--compile --activation-memory-budget 0.5`` on the CPU gives eager's losses (opt-in like test_compile_cpu)."""

from __future__ import annotations

import csv
import os
import shutil

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("RFDETR_TEST_COMPILE") != "1", reason="opt-in: RFDETR_TEST_COMPILE=1"),
    pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("c++") is None, reason="needs gcc"),
]

LOSSES = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce", "loss_mask_dice")


def _losses(dataset, out, **options) -> list[dict[str, float]]:
    import rfdetr_train

    result = rfdetr_train.train(
        data=str(dataset), model="seg-tiny", output=str(out), steps=3, batch_size=2, resolution=64, workers=0,
        log_every=1, steps_per_validation=100, progress=False, plots=False, gallery_images=0, seed=0, **options,
    )  # fmt: skip
    with open(result.run_dir / "train_log.csv") as f:
        return [{k: float(row[k]) for k in LOSSES} for row in csv.DictReader(f)]


def test_compiled_training_with_memory_budget_equals_eager(tmp_path):
    import torch._functorch.config

    from rfdetr_train.data.synthetic import generate

    torch.set_num_threads(1)
    dataset = generate(tmp_path / "data", seed=7, sizes={"train": 4, "val": 2, "test": 1})
    eager = _losses(dataset, tmp_path / "eager")
    budget = torch._functorch.config.activation_memory_budget
    try:
        compiled = _losses(dataset, tmp_path / "compiled", compile=True, activation_memory_budget=0.5)
    finally:
        torch._functorch.config.activation_memory_budget = budget
    for e, c in zip(eager, compiled, strict=True):
        for k in LOSSES:
            assert c[k] == pytest.approx(e[k], rel=1e-4, abs=1e-6), (k, e, c)
