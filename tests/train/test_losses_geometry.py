"""Box geometry and point sampling used by the losses and the matcher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from rfdetr_train.losses.box_ops import (
    box_cxcywh_to_xyxy,
    matched_box_iou,
    matched_generalized_box_iou,
    pairwise_generalized_box_iou,
)
from rfdetr_train.losses.point_sampling import (
    ImportancePointSampler,
    UniformPointSampler,
    loss_num_points,
    match_num_points,
    sample_points,
)
from rfdetr_train.losses.targets import TargetBatch


def _boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.4 + 0.05
    return torch.cat([cxcy, wh], -1)


def test_cxcywh_to_xyxy_equals_torchvision_and_clamps_negative_sizes():
    boxes = _boxes(20, 0)
    assert torch.allclose(box_cxcywh_to_xyxy(boxes), box_convert(boxes, "cxcywh", "xyxy"))
    inverted = torch.tensor([[0.5, 0.5, -0.2, 0.1]])
    assert torch.allclose(box_cxcywh_to_xyxy(inverted), torch.tensor([[0.5, 0.45, 0.5, 0.55]]))


def test_pairwise_giou_equals_torchvision_batched():
    a = box_cxcywh_to_xyxy(torch.stack([_boxes(7, 1), _boxes(7, 2)]))  # [2, 7, 4]
    b = box_cxcywh_to_xyxy(torch.stack([_boxes(4, 3), _boxes(4, 4)]))  # [2, 4, 4]
    ours = pairwise_generalized_box_iou(a, b)
    assert ours.shape == (2, 7, 4)
    for i in range(2):
        assert torch.allclose(ours[i], generalized_box_iou(a[i], b[i]), atol=1e-6)


def test_matched_iou_and_giou_are_the_pairwise_diagonal():
    a, b = box_cxcywh_to_xyxy(_boxes(9, 5)), box_cxcywh_to_xyxy(_boxes(9, 6))
    assert torch.allclose(matched_generalized_box_iou(a, b), generalized_box_iou(a, b).diagonal(), atol=1e-6)
    iou, _ = matched_box_iou(a, a)
    assert torch.equal(iou, torch.ones(9))  # identical boxes: exactly 1
    with pytest.raises(ValueError):
        matched_box_iou(a, b[:3])


def test_degenerate_boxes_stay_finite():
    point = torch.tensor([[0.3, 0.3, 0.3, 0.3]])  # zero area
    assert torch.isfinite(pairwise_generalized_box_iou(point, point)).all()
    assert torch.isfinite(matched_generalized_box_iou(point, point)).all()


def test_mask_nearest_sampling_equals_grid_sample_nearest_for_mixed_sizes():
    g = torch.Generator().manual_seed(0)
    sizes = [(5, 13, 21), (0, 8, 8), (3, 40, 7)]  # (objects, h, w) per image
    targets = [
        {
            "labels": torch.zeros(n, dtype=torch.int64),
            "boxes": torch.rand(n, 4),
            "masks": torch.rand(n, h, w, generator=g) > 0.5,
        }
        for n, h, w in sizes
    ]
    batch = TargetBatch.from_targets(targets, torch.device("cpu"), need_masks=True)
    flat = [m for t in targets for m in t["masks"]]  # the 8 objects in batch order
    idx = torch.tensor([7, 0, 2, 2, 5])
    coords = torch.rand(len(idx), 300, 2, generator=g)
    coords[0, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [1 / 7, 0.5]])  # borders and exact ties
    expected = torch.stack(
        [
            F.grid_sample(
                flat[i].float()[None, None],
                (2 * coords[k] - 1).view(1, -1, 1, 2),
                mode="nearest",
                padding_mode="border",
                align_corners=False,
            ).view(-1)
            for k, i in enumerate(idx.tolist())
        ]
    )
    assert torch.equal(batch.sample_masks(idx, coords), expected)
    shared = coords[1]  # one set of points for all rows
    assert torch.equal(
        batch.sample_masks(idx, shared), batch.sample_masks(idx, shared.expand(len(idx), -1, -1))
    )


def test_sample_points_is_bilinear_at_pixel_centres():
    maps = torch.arange(12.0).reshape(1, 1, 3, 4)
    centres = torch.tensor([[[(1 + 0.5) / 4, (2 + 0.5) / 3], [0.0, 0.0], [0.5, (1 + 0.5) / 3]]])
    out = sample_points(maps, centres)[0, 0]
    assert torch.allclose(out, torch.tensor([9.0, 0.0, 5.5]))  # centre, border-clamped corner, midpoint


def test_importance_sampler_prefers_uncertain_points():
    logits = torch.full((2, 1, 16, 16), 8.0)
    logits[:, :, :, 8:] = -8.0
    logits[:, :, :, 7:9] = 0.0  # the boundary columns: most uncertain
    torch.manual_seed(0)
    points = ImportancePointSampler(oversample_ratio=10, importance_ratio=0.75)(logits, 40)
    assert points.shape == (2, 40, 2)
    assert ((points >= 0) & (points <= 1)).all()
    uncertain = points[:, :30, 0]  # the importance-sampled part comes first
    assert ((uncertain > 6 / 16) & (uncertain < 10 / 16)).all()  # ~75 of 400 candidates lie there
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        ImportancePointSampler(generator=g1)(logits, 40), ImportancePointSampler(generator=g2)(logits, 40)
    )
    with pytest.raises(ValueError):
        ImportancePointSampler(importance_ratio=1.5)


def test_point_counts_follow_upstream_rule():
    assert loss_num_points(108, 108, 16) == 729  # Seg-Medium
    assert loss_num_points(78, 78, 16) == 380  # Seg-Nano
    assert loss_num_points(10, 10, 16) == 10  # at least h
    assert match_num_points(108, 108, 16) == 729
    assert UniformPointSampler()(7, torch.device("cpu")).shape == (7, 2)
