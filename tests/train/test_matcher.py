"""Hungarian matcher: costs against a naive reference, brute-force optimality, batching, groups, robustness."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou

from rfdetr_train.losses import HungarianMatcher, MatchCosts, TargetBatch, TargetFormatError
from rfdetr_train.losses.box_ops import box_cxcywh_to_xyxy


def _fixed_points(num_points, device):
    # The same points on every call, so separate match() calls are comparable.
    return torch.rand(num_points, 2, generator=torch.Generator().manual_seed(0)).to(device)


def _case(sizes, nq, k=4, c=8, mask_hw=(12, 16), gt_hw=None, seed=0, dense=False):
    """Outputs for len(sizes) images with nq queries, and targets with sizes[i] objects."""
    g = torch.Generator().manual_seed(seed)
    b = len(sizes)

    def boxes(*lead):
        return torch.cat(
            [torch.rand(*lead, 2, generator=g) * 0.6 + 0.2, torch.rand(*lead, 2, generator=g) * 0.3 + 0.05],
            -1,
        )

    outputs = {
        "pred_logits": torch.randn(b, nq, k, generator=g) * 2,
        "pred_boxes": boxes(b, nq),
        "pred_masks": {
            "spatial_features": torch.randn(b, c, *mask_hw, generator=g),
            "query_features": torch.randn(b, nq, c, generator=g),
            "bias": torch.randn(1, generator=g),
        },
    }
    if dense:
        pm = outputs["pred_masks"]
        outputs["pred_masks"] = (
            torch.einsum("bchw,bqc->bqhw", pm["spatial_features"], pm["query_features"]) + pm["bias"]
        )
    targets = []
    for i, n in enumerate(sizes):
        h, w = gt_hw[i] if gt_hw else (24, 32)
        targets.append(
            {
                "labels": torch.randint(0, k, (n,), generator=g),
                "boxes": boxes(n),
                "masks": torch.rand(n, h, w, generator=g) > 0.6,
            }
        )
    return outputs, targets


def _pack(targets, masks=True):
    return TargetBatch.from_targets(targets, torch.device("cpu"), need_masks=masks)


def _reference_cost(out, target, b, points, matcher):
    """Naive per-pair cost of image b, written from the formulas (no batching, torchvision GIoU)."""
    logits, boxes = out["pred_logits"][b], out["pred_boxes"][b]
    pm = out["pred_masks"]
    dense = torch.einsum("chw,qc->qhw", pm["spatial_features"][b], pm["query_features"][b]) + pm["bias"]
    grid = (2 * points - 1).view(1, -1, 1, 2)
    pred_pts = F.grid_sample(dense.unsqueeze(0), grid, align_corners=False, padding_mode="border")[0, :, :, 0]
    gt_pts = F.grid_sample(
        target["masks"].float().unsqueeze(0), grid, mode="nearest", align_corners=False, padding_mode="border"
    )[0, :, :, 0]
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target["boxes"]))
    a, gam = matcher.focal_alpha, matcher.focal_gamma
    cost = torch.zeros(logits.shape[0], len(target["labels"]))
    for q in range(cost.shape[0]):
        for t in range(cost.shape[1]):
            p = logits[q, target["labels"][t]].sigmoid()
            cls = a * (1 - p) ** gam * -torch.log(p) - (1 - a) * p**gam * -torch.log(1 - p)
            l1 = (boxes[q] - target["boxes"][t]).abs().sum()
            x, y = pred_pts[q], gt_pts[t]
            bce = F.binary_cross_entropy_with_logits(x, y)
            s = x.sigmoid()
            dice = 1 - (2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)
            cost[q, t] = 5 * l1 + 2 * cls - 2 * giou[q, t] + 5 * bce + 5 * dice
    return cost


def test_cost_matrix_equals_naive_reference():
    out, targets = _case([3, 2], nq=6)
    matcher = HungarianMatcher(match_point_sampler=_fixed_points)
    cost = matcher.cost_matrix(out, _pack(targets))  # [2, 6, 3]
    points = _fixed_points(12 * 16 // 16, torch.device("cpu"))
    for b, target in enumerate(targets):
        expected = _reference_cost(out, target, b, points, matcher)
        assert torch.allclose(cost[b, :, : len(target["labels"])], expected, atol=1e-4)


@pytest.mark.parametrize(("nq", "n", "seed"), [(5, 3, 0), (4, 4, 1), (3, 5, 2), (6, 1, 3)])
def test_assignment_is_optimal_by_brute_force(nq, n, seed):
    out, targets = _case([n], nq=nq, seed=seed)
    matcher = HungarianMatcher(match_point_sampler=_fixed_points)
    cost = matcher.cost_matrix(out, _pack(targets))[0]  # [nq, n]
    (matches,) = matcher.match([out], _pack(targets))
    q, t = matches.per_image()[0]
    assert len(q) == min(nq, n) and len(set(q.tolist())) == len(q) and len(set(t.tolist())) == len(t)
    ours = cost[q, t].sum()
    if nq >= n:  # every object gets a distinct query
        best = min(cost[list(p), list(range(n))].sum() for p in itertools.permutations(range(nq), n))
    else:  # every query gets a distinct object
        best = min(cost[list(range(nq)), list(p)].sum() for p in itertools.permutations(range(n), nq))
    assert torch.isclose(ours, best, atol=1e-5)


def test_batched_equals_per_image_with_mixed_mask_sizes():
    sizes, gt_hw = [3, 0, 5, 1], [(24, 32), (10, 10), (48, 40), (7, 9)]
    out, targets = _case(sizes, nq=8, gt_hw=gt_hw, seed=4)
    matcher = HungarianMatcher(match_point_sampler=_fixed_points)
    aux = {k: (v.flip(1) if k != "pred_masks" else v) for k, v in out.items()}  # a second, different layer
    batched = matcher.match([out, aux], _pack(targets))
    for b in range(len(sizes)):

        def one(layer, b=b):
            pm = layer["pred_masks"]
            return {
                "pred_logits": layer["pred_logits"][b : b + 1],
                "pred_boxes": layer["pred_boxes"][b : b + 1],
                "pred_masks": {
                    "spatial_features": pm["spatial_features"][b : b + 1],
                    "query_features": pm["query_features"][b : b + 1],
                    "bias": pm["bias"],
                },
            }

        single = matcher.match([one(out), one(aux)], _pack(targets[b : b + 1]))
        for layer in range(2):
            (q1, t1), (q2, t2) = batched[layer].per_image()[b], single[layer].per_image()[0]
            assert torch.equal(q1, q2) and torch.equal(t1, t2)
    # Flat target ids point into the concatenation of all images' objects.
    m = batched[0]
    offsets = torch.tensor([0, 3, 3, 8])
    assert torch.equal(m.flat_target_idx, m.target_idx + offsets[m.batch_idx])
    assert m.counts == (3, 0, 5, 1)


def test_groups_are_matched_independently():
    groups, q = 3, 4
    out, targets = _case([3, 2], nq=groups * q, seed=5)
    matcher = HungarianMatcher(match_point_sampler=_fixed_points)
    (grouped,) = matcher.match([out], _pack(targets), group_detr=groups)
    for b in range(2):
        gq, gt = grouped.per_image()[b]
        n = len(targets[b]["labels"])
        assert len(gq) == groups * n
        for g in range(groups):
            part = {
                "pred_logits": out["pred_logits"][:, g * q : (g + 1) * q],
                "pred_boxes": out["pred_boxes"][:, g * q : (g + 1) * q],
                "pred_masks": {
                    **out["pred_masks"],
                    "query_features": out["pred_masks"]["query_features"][:, g * q : (g + 1) * q],
                },
            }
            (alone,) = matcher.match([part], _pack(targets))
            aq, at = alone.per_image()[b]
            assert torch.equal(gq[g * n : (g + 1) * n], aq + g * q)  # group g's block, query offset g*Q
            assert torch.equal(gt[g * n : (g + 1) * n], at)
            assert sorted(at.tolist()) == list(range(n))  # each object once per group


def test_dense_masks_match_like_lazy_masks():
    lazy, targets = _case([2, 3], nq=6, seed=6)
    dense, _ = _case([2, 3], nq=6, seed=6, dense=True)
    matcher = HungarianMatcher(match_point_sampler=_fixed_points)
    assert torch.allclose(
        matcher.cost_matrix(lazy, _pack(targets)), matcher.cost_matrix(dense, _pack(targets)), atol=1e-4
    )


def test_empty_targets_give_empty_matches_without_drawing_points():
    calls = []
    matcher = HungarianMatcher(match_point_sampler=lambda n, d: calls.append(n) or _fixed_points(n, d))
    out, targets = _case([0, 0], nq=6)
    matches = matcher.match([out, out], _pack(targets), group_detr=2)
    assert calls == [] and len(matches) == 2
    assert all(m.num_pairs == 0 and m.counts == (0, 0) and m.batch_idx.numel() == 0 for m in matches)


def test_non_finite_costs_are_replaced_by_a_sentinel():
    out, targets = _case([2, 3], nq=8, seed=7)
    out["pred_logits"][0, :3] = float("nan")
    out["pred_boxes"][1, 5:] = float("inf")
    matcher = HungarianMatcher(match_point_sampler=_fixed_points)
    (m,) = matcher.match([out], _pack(targets))
    (q0, _), (q1, _) = m.per_image()
    assert len(q0) == 2 and len(q1) == 3
    assert not set(q0.tolist()) & {0, 1, 2}  # enough finite queries: the poisoned ones are never taken
    assert not set(q1.tolist()) & {5, 6, 7}
    out["pred_logits"][:] = float("nan")  # everything non-finite: still a full assignment
    (m,) = matcher.match([out], _pack(targets))
    assert m.counts == (2, 3)


def test_bad_inputs_raise_clear_errors():
    out, targets = _case([2], nq=6, k=4)
    matcher = HungarianMatcher(match_point_sampler=_fixed_points)
    targets[0]["labels"] = torch.tensor([1, 4])
    with pytest.raises(TargetFormatError, match=r"labels span \[1, 4\].*4 class slots"):
        matcher.match([out], _pack(targets))
    targets[0]["labels"] = torch.tensor([1, 2])
    with pytest.raises(TargetFormatError, match="group_detr=4"):
        matcher.match([out], _pack(targets), group_detr=4)
    with pytest.raises(TargetFormatError, match="batch of 1 outputs but 2 targets"):
        matcher.match([out], _pack(targets + targets))
    with pytest.raises(TargetFormatError, match="masks"):
        _pack([{"labels": torch.tensor([1]), "boxes": torch.rand(1, 4)}])
    with pytest.raises(TargetFormatError, match="boxes"):
        _pack([{"labels": torch.tensor([1]), "boxes": torch.rand(2, 4), "masks": torch.zeros(1, 4, 4)}])
    with pytest.raises(ValueError):
        HungarianMatcher(MatchCosts(cls=0, bbox=0, giou=0))


@pytest.mark.gpu
def test_one_host_sync_per_match_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    out, targets = _case([5, 0, 9, 3], nq=13 * 20, seed=8)
    move = lambda x: {k: move(v) for k, v in x.items()} if isinstance(x, dict) else x.to(device)  # noqa: E731
    out, targets = move(out), [move(t) for t in targets]
    aux = [move(_case([5, 0, 9, 3], nq=13 * 20, seed=9 + i)[0]) for i in range(3)]
    matcher = HungarianMatcher()
    batch = TargetBatch.from_targets(targets, device, need_masks=True)
    matcher.match([out, *aux], batch, group_detr=13)  # warm-up (lazy init, pinned-memory pool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            matches = matcher.match([out, *aux], batch, group_detr=13)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert all(m.counts == (65, 0, 117, 39) for m in matches)


def test_threaded_solver_gives_the_serial_result(monkeypatch):
    import rfdetr_train.losses.matcher as matcher_module

    out, targets = _case([3, 0, 4], nq=3 * 6, seed=10)
    matcher = HungarianMatcher(match_point_sampler=_fixed_points)
    monkeypatch.setattr(matcher_module, "_solver_threads", lambda: 1)
    serial = matcher.match([out, out], _pack(targets), group_detr=3)
    monkeypatch.setattr(matcher_module, "_solver_threads", lambda: 4)
    monkeypatch.setattr(matcher_module, "_MIN_PROBLEMS_FOR_THREADS", 2)
    threaded = matcher.match([out, out], _pack(targets), group_detr=3)
    for a, b in zip(serial, threaded):
        assert torch.equal(a.query_idx, b.query_idx) and torch.equal(a.target_idx, b.target_idx)
        assert a.counts == b.counts == (9, 0, 12)
