"""``--compile --compile-mode reduce-overhead --activation-memory-budget 0.5`` on CUDA: the trainer's CUDA-graph
path gives eager's losses (float32; a GPU test).

Tolerances: the paths are not the same (inductor's kernels against eager's), so nothing is exact, and eager
itself was not reproducible between two GPU runs of this test (step-1 total 24.4322, then 24.4330; cause not
measured). Step 1 (the same weights on both sides) as measured on an H200 (torch 2.11,
2026-12-04, two runs): total loss rel. 1.1e-4 and 1.6e-4, loss_ce 4e-6 / 1.4e-5, loss_bbox 2e-7, loss_giou
equal, loss_mask_dice 1.1e-4, loss_mask_ce 1.2e-3, gradient norm 1.3e-3. The mask terms move most: they are
point-sampled on a few matched masks whose logits sit near 0 at random init (why exactly was not measured).
So step 1 holds the total and the class and box terms to the issue's 1e-3 and the mask terms and the gradient
norm to 1e-2; later steps only to 5e-2: AdamW's first update is about lr * sign(gradient), so a gradient element
near 0 whose sign differs between the kernels moves by 2 lr (the total drifted up to 1.3 % by step 4).
The point-sampled mask terms of later steps are not compared on their own: their points are the most uncertain
of the candidates (|logit| nearest 0), so weights that differ after step 1 pick other points, and the terms
wander. Measured on H100s (torch 2.11): 2026-12-07 step 4 loss_mask_ce 0.1739 eager against 0.1972 graphs (13 %,
total 0.18 %); 2026-12-08 step 3 loss_mask_ce 0.2041 against 0.2900 (42 %) while the total was 19.551 against
19.849 (1.5 %) and step 1 passed its bounds (total 5.2e-4, loss_mask_ce 8.5e-4, gradient norm 5.9e-3). They stay
in the later steps' total (5e-2), and step 1 holds them to 1e-2: with the same weights the same points are drawn,
so a wrong mask loss or gradient shows there.
Run it with ``--tb=short`` and keep the whole log.
"""

from __future__ import annotations

import csv

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LOSSES = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce", "loss_mask_dice")
FIRST = (*LOSSES, "grad_norm")


def _losses(dataset, out, **compile_options) -> list[dict[str, float]]:
    import rfdetr_train

    result = rfdetr_train.train(
        data=str(dataset), model="seg-tiny", output=str(out), steps=4, batch_size=2, resolution=96, workers=0,
        log_every=1, steps_per_validation=100, progress=False, plots=False, gallery_images=0, seed=0,
        device="cuda", mixed_precision="no", **compile_options,
    )  # fmt: skip
    with open(result.run_dir / "train_log.csv") as f:
        return [{k: float(row[k]) for k in FIRST} for row in csv.DictReader(f)]


def test_cuda_graph_training_with_memory_budget_equals_eager(tmp_path):
    import torch._functorch.config

    from rfdetr_train.data.synthetic import generate

    dataset = generate(tmp_path / "data", seed=7, sizes={"train": 4, "val": 2, "test": 1})
    eager = _losses(dataset, tmp_path / "eager")
    budget = torch._functorch.config.activation_memory_budget
    try:
        graphs = _losses(
            dataset,
            tmp_path / "graphs",
            compile=True,
            compile_mode="reduce-overhead",
            activation_memory_budget=0.5,
        )
        assert torch._functorch.config.activation_memory_budget == 0.5
    finally:
        torch._functorch.config.activation_memory_budget = budget
        torch._dynamo.reset()
    assert len(eager) == len(graphs) == 4
    for k in FIRST:  # step 1: the same weights on both sides
        print(f"step 1 {k}: eager {eager[0][k]:.9g} graphs {graphs[0][k]:.9g}")
    for k in FIRST:
        rel = 1e-2 if k in ("loss_mask_ce", "loss_mask_dice", "grad_norm") else 1e-3
        assert graphs[0][k] == pytest.approx(eager[0][k], rel=rel, abs=1e-6), (k, eager[0], graphs[0])
    for e, g in zip(eager[1:], graphs[1:], strict=True):
        for k in ("loss", "loss_ce", "loss_bbox", "loss_giou"):  # the mask terms: see the module docstring
            assert g[k] == pytest.approx(e[k], rel=5e-2, abs=1e-4), (k, e, g)
