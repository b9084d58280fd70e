"""Parity of our criterion and matcher with upstream rfdetr 1.11.2's SetCriterion / HungarianMatcher.

Both sides see the same synthetic outputs and targets (one image without objects, ground-truth masks at a
different resolution than the predicted ones, non-square masks). Upstream's random draws are pinned: the
matcher's ``torch.rand`` returns points we also hand to our matcher, and the criterion's uncertain-point sampler
is recorded and replayed into ours.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from criterion_cases import leaves

from rfdetr_train.losses import LayerMatches, build_criterion

pytestmark = pytest.mark.parity

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GROUPS, QUERIES, CHANNELS, MASK_H, MASK_W = 13, 5, 16, 20, 28
# (objects, h, w) per image: an image without objects, more objects than queries per group (image 2), GT masks
# at twice the prediction's resolution. Upstream needs one GT mask size per batch; ours also takes mixed sizes.
GT_SIZES = [(3, 40, 56), (0, 40, 56), (7, 40, 56)]
EMPTY_SIZES = [(0, 40, 56), (0, 40, 56)]


def _make_case(num_slots: int, seed: int, gt_sizes):
    g = torch.Generator().manual_seed(seed)
    batch, nq = len(gt_sizes), GROUPS * QUERIES

    def boxes(*lead):
        cxcy = torch.rand(*lead, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(*lead, 2, generator=g) * 0.35 + 0.05
        return torch.cat([cxcy, wh], -1)

    def layer():
        return {
            "pred_logits": torch.randn(batch, nq, num_slots, generator=g) * 2,
            "pred_boxes": boxes(batch, nq),
            "pred_masks": {
                "spatial_features": torch.randn(batch, CHANNELS, MASK_H, MASK_W, generator=g),
                "query_features": torch.randn(batch, nq, CHANNELS, generator=g) * 0.5,
                "bias": torch.randn(1, generator=g),
            },
        }

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(2)]
    outputs["enc_outputs"] = layer()
    targets = []
    for n, h, w in gt_sizes:
        # Blobby masks (a random box per object) so predictions and labels correlate a little.
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        for i in range(n):
            y0, x0 = (
                int(torch.randint(0, h // 2, (1,), generator=g)),
                int(torch.randint(0, w // 2, (1,), generator=g)),
            )
            masks[i, y0 : y0 + h // 2, x0 : x0 + w // 2] = True
        targets.append(
            {"labels": torch.randint(0, num_slots, (n,), generator=g), "boxes": boxes(n), "masks": masks}
        )
    return outputs, targets


def _with_grad(outputs):
    """Deep copy whose float leaves require grad, so both criteria build their own graph."""
    copied = copy.deepcopy(outputs)

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node.clone().requires_grad_(True)

    return walk(copied)


class _FixedRandTorch:
    """Stands in for the `torch` module inside upstream's matcher: `rand` returns the points we chose."""

    def __init__(self, points):
        self._points = list(points)

    def rand(self, *size, device=None, **_):
        pts = self._points.pop(0)
        assert tuple(size) == (1, *pts.shape), f"unexpected matcher draw {size}"
        return pts.reshape(size).to(device)

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture(scope="module")
def upstream():
    pytest.importorskip("rfdetr")
    from rfdetr.config import RFDETRSegNanoConfig, SegmentationTrainConfig
    from rfdetr.models import build_criterion_from_config

    num_classes = 4  # upstream keeps num_classes + 1 logit slots
    model_config = RFDETRSegNanoConfig(pretrain_weights=None, device="cpu", num_classes=num_classes)
    criterion, _ = build_criterion_from_config(
        model_config, SegmentationTrainConfig(dataset_dir=".", output_dir=".")
    )
    assert criterion.group_detr == GROUPS and criterion.training
    return criterion, num_classes + 1


def _run_upstream(criterion, outputs, targets, matcher_points, monkeypatch):
    import rfdetr.models.criterion as up_criterion
    import rfdetr.models.matcher as up_matcher

    monkeypatch.setattr(up_matcher, "torch", _FixedRandTorch(matcher_points))
    recorded_points, recorded_matches = [], []
    real_sampler = up_criterion.get_uncertain_point_coords_with_randomness

    def recording_sampler(*args, **kwargs):
        points = real_sampler(*args, **kwargs)
        recorded_points.append(points.clone())
        return points

    monkeypatch.setattr(up_criterion, "get_uncertain_point_coords_with_randomness", recording_sampler)
    hook = criterion.matcher.register_forward_hook(lambda _m, _i, out: recorded_matches.append(out))
    try:
        losses = criterion(outputs, targets)
    finally:
        hook.remove()
        monkeypatch.undo()
    return losses, recorded_points, recorded_matches


def _replay(points):
    queue = list(points)

    def sampler(mask_logits, num_points):
        pts = queue.pop(0)
        assert pts.shape == (mask_logits.shape[0], num_points, 2)
        return pts

    return sampler, queue


@pytest.mark.parametrize(("seed", "gt_sizes"), [(0, GT_SIZES), (1, GT_SIZES), (2, EMPTY_SIZES)])
def test_matching_and_losses_match_upstream(upstream, monkeypatch, seed, gt_sizes):
    up_criterion, num_slots = upstream
    outputs, targets = _make_case(num_slots, seed, gt_sizes)
    num_points = MASK_H * MASK_W // 16
    g = torch.Generator().manual_seed(100 + seed)
    matcher_points = [torch.rand(num_points, 2, generator=g) for _ in range(4)]  # final, aux 0, aux 1, enc

    up_outputs = _with_grad(outputs)
    up_losses, loss_points, up_matches = _run_upstream(
        up_criterion, up_outputs, targets, [p.clone() for p in matcher_points], monkeypatch
    )
    sizes = [n for n, _, _ in gt_sizes]
    assert len(up_matches) == 4 and len(loss_points) == (4 if sum(sizes) else 0)

    queue = list(matcher_points)
    ours = build_criterion(num_slots, GROUPS, match_point_sampler=lambda n, device: queue.pop(0))
    our_matches = ours.match(outputs, targets)
    assert len(queue) == (0 if sum(sizes) else 4)  # a batch without objects needs no matching at all
    for layer, (mine, theirs) in enumerate(zip(our_matches, up_matches)):
        for image, ((q, t), (uq, ut)) in enumerate(zip(mine.per_image(), theirs)):
            assert torch.equal(q, uq) and torch.equal(t, ut), (
                f"layer {layer} image {image} matched differently"
            )
        assert mine.num_pairs == GROUPS * sum(min(QUERIES, n) for n in sizes)  # image 2: more objects than Q

    # Losses given fixed matching indices (upstream's) and upstream's loss points.
    fixed = [LayerMatches.from_per_image(m, sizes, torch.device("cpu")) for m in up_matches]
    sampler, remaining = _replay(loss_points)
    ours.point_sampler = sampler
    our_outputs = _with_grad(outputs)
    our_losses = ours(our_outputs, targets, matches=fixed)
    assert not remaining

    assert set(our_losses) == {k for k in up_losses if k.startswith("loss_")}
    assert len(our_losses) == 20
    for key, value in our_losses.items():
        expected = up_losses[key].detach()
        assert torch.allclose(value.detach(), expected, rtol=1e-4, atol=1e-7), (
            key,
            float(value),
            float(expected),
        )

    # Same weights, and the weighted totals give the same gradients.
    up_total = sum(
        up_criterion.weight_dict[k] * v for k, v in up_losses.items() if k in up_criterion.weight_dict
    )
    our_total = ours.total_loss(our_losses)
    assert torch.allclose(our_total.detach(), up_total.detach(), rtol=1e-4)
    up_total.backward()
    our_total.backward()
    for mine, theirs in zip(leaves(our_outputs), leaves(up_outputs)):
        scale = theirs.grad.abs().max().clamp(min=1e-6)
        assert (mine.grad - theirs.grad).abs().max() <= 1e-4 * scale


def test_importance_sampler_matches_upstream_draws():
    pytest.importorskip("rfdetr")
    from rfdetr.models.heads.segmentation import (
        calculate_uncertainty,
        get_uncertain_point_coords_with_randomness,
    )

    from rfdetr_train.losses import ImportancePointSampler

    logits = torch.randn(6, 1, 20, 28, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    theirs = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 140, 3, 0.75)
    torch.manual_seed(7)
    mine = ImportancePointSampler()(logits, 140)
    assert torch.equal(mine, theirs)
