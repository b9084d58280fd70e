"""Training with the 1x1 mask projection folded into the queries (the CUDA default) gives the losses and
gradients of the projected maps (the CPU default): the matcher and criterion read both kinds of lazy entry."""

from __future__ import annotations

import pytest
import torch

from rfdetr_core.factory import build_model
from rfdetr_train.losses import build_criterion


def _targets(batch: int, classes: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(batch):
        n = 2 + i
        out.append(
            {
                "labels": torch.randint(0, classes, (n,), generator=g),
                "boxes": torch.cat(
                    [torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1
                ),
                "masks": torch.rand(n, size, size, generator=g) > 0.5,
            }
        )
    return out


@pytest.mark.parametrize("batch_layers", [False, True])
def test_folded_and_projected_entries_give_the_same_losses_and_gradients(batch_layers):
    torch.manual_seed(0)
    model = build_model("seg-tiny").train()
    size = 4 * model.spec.size_multiple
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    targets = _targets(2, model.num_slots, size)
    crit = build_criterion(model.num_slots, model.group_detr)
    crit.batch_layers = batch_layers
    results = {}
    for fold in (False, True):
        model.mask_head.fold_in_training = fold
        model.zero_grad(set_to_none=True)
        out = model(images)
        assert out["pred_masks"]["bias"].shape == (
            (2, model.group_detr * model.num_queries) if fold else (1,)
        )
        torch.manual_seed(7)  # the same matcher and loss points
        losses = crit(out, targets)
        crit.total_loss(losses).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fold] = ({k: float(v.detach()) for k, v in losses.items()}, grads)
    (projected, projected_grads), (folded, folded_grads) = results[False], results[True]
    assert folded.keys() == projected.keys() and any(k.startswith("loss_mask_dice") for k in folded)
    for key, value in projected.items():
        assert folded[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert folded_grads.keys() == projected_grads.keys()
    for name, grad in projected_grads.items():
        torch.testing.assert_close(folded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_folded_entries_hand_over_the_maps_in_the_autocast_dtype():
    # On CUDA the blocks' residual stream stays float32 under autocast (float32 projector features, LayerNorm
    # autocast to float32); handing it over as is doubled the maps the criterion keeps for backward and raised the
    # GPU step's peak (docs/benchmarks.md, issue 18, call 4b). Float32 features give that stream on the CPU too.
    torch.manual_seed(0)
    head = build_model("seg-tiny").mask_head
    head.fold_in_training = True
    c = head.spatial_proj.in_channels
    features = torch.randn(2, c, 6, 6)  # float32 [B, C, h, w]
    hs_layers = [torch.randn(2, 5, c) for _ in head.blocks]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers, enc = head.lazy(features, hs_layers, torch.randn(2, 5, c), (24, 24))
    for masks in (*layers, enc):
        assert masks["spatial_features"].shape == (2, c, 6, 6)
        assert masks["spatial_features"].dtype == masks["query_features"].dtype == torch.bfloat16
