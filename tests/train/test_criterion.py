"""SetCriterion: loss keys and weights, known values, empty images, NaN detection, batching, dtype handling."""

from __future__ import annotations

import re

import pytest
import torch
from criterion_cases import criterion_case, leaves, to_device

from rfdetr_train.losses import LayerMatches, SetCriterion, TargetFormatError, build_criterion

K, C, GROUPS, Q = 3, 8, 2, 5


def _same_points(mask_logits, num_points):
    # Identical points for every mask, so per-image and batched evaluations see the same samples.
    pts = torch.rand(1, num_points, 2, generator=torch.Generator().manual_seed(0))
    return pts.expand(mask_logits.shape[0], -1, -1).to(mask_logits.device)


def _match_points(num_points, device):
    return torch.rand(num_points, 2, generator=torch.Generator().manual_seed(1)).to(device)


def _case(sizes, seed=0, aux=1, gt_hw=None):
    return criterion_case(
        sizes,
        seed,
        slots=K,
        queries=GROUPS * Q,
        channels=C,
        aux=aux,
        mask_hw=(10, 14),
        gt_hw=(lambda i: gt_hw[i]) if gt_hw else (lambda i: (20, 28)),
    )


def _requires_grad(node):
    for leaf in leaves(node):
        leaf.requires_grad_(True)
    return node


def _criterion(**kw):
    return build_criterion(K, GROUPS, point_sampler=_same_points, match_point_sampler=_match_points, **kw)


def _slice(out, b):
    def one(layer):
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

    sliced = one(out)
    sliced["aux_outputs"] = [one(a) for a in out["aux_outputs"]]
    sliced["enc_outputs"] = one(out["enc_outputs"])
    return sliced


def test_keys_weights_and_total():
    out, targets = _case([2, 1], aux=2)
    crit = _criterion()
    losses = crit(out, targets)
    base = ["loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce", "loss_mask_dice"]
    assert sorted(losses) == sorted(k + s for k in base for s in ("", "_0", "_1", "_enc"))
    assert crit.weight_dict == {
        "loss_ce": 1.0,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
        "loss_mask_ce": 5.0,
        "loss_mask_dice": 5.0,
    }
    expected = sum(crit.weight_dict[re.sub(r"_(\d+|enc)$", "", k)] * v for k, v in losses.items())
    assert torch.allclose(crit.total_loss(losses), expected)
    # the stacked reduction that total_loss uses off the CPU: same value and the same gradients (the weights)
    leaves = {k: v.detach().requires_grad_() for k, v in losses.items()}
    stacked = crit.weighted_sum(leaves)
    assert torch.allclose(stacked, expected, rtol=1e-6)
    stacked.backward()
    for key, leaf in leaves.items():
        assert leaf.grad.item() == crit.weight_for(key)
    assert len(crit._weight_vectors) == 1 and torch.equal(crit.weighted_sum(losses), stacked.detach())
    assert crit.weight_for("loss_mask_dice_enc") == 5.0 and crit.weight_for("loss_giou_12") == 2.0
    with pytest.raises(KeyError):
        crit.weight_for("loss_unknown")
    with pytest.raises(KeyError):
        crit.weight_for("loss_ce_x")
    detection = _criterion(segmentation=False)
    assert "loss_mask_ce" not in detection.weight_dict
    det_losses = detection(out, [{k: t[k] for k in ("labels", "boxes")} for t in targets])
    assert len(det_losses) == 12


def test_known_values_for_perfect_boxes_and_normaliser():
    """One object matched in each of 2 groups: L1 and GIoU of an exact box are 0, num_boxes = 1 x 2 groups."""
    out, targets = _case([1], aux=0)
    target_box = targets[0]["boxes"][0]
    out["pred_boxes"][0, :] = target_box  # every query predicts the exact box
    crit = _criterion()
    losses = crit(out, targets)
    assert losses["loss_bbox"].abs() < 1e-6 and losses["loss_giou"].abs() < 1e-6
    assert crit.num_boxes(crit_batch(targets), torch.device("cpu")) == 2.0
    crit.eval()  # eval: one group (the model then emits group 0 only)
    assert crit.num_boxes(crit_batch(targets), torch.device("cpu")) == 1.0


def crit_batch(targets):
    from rfdetr_train.losses import TargetBatch

    return TargetBatch.from_targets(targets, torch.device("cpu"), need_masks=True)


def test_ia_bce_by_hand_for_one_matched_cell():
    """Single query, single class, single object: the IA-BCE formula written out."""
    logits = torch.tensor([[[0.7]]], requires_grad=True)
    pred = torch.tensor([[[0.5, 0.5, 0.4, 0.4]]])
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}
    crit = SetCriterion(1, 1, segmentation=False)
    losses = crit({"pred_logits": logits, "pred_boxes": pred}, [target])
    p = torch.sigmoid(torch.tensor(0.7))
    iou = 0.5  # 0.2 x 0.4 inside 0.4 x 0.4
    t = max(float(p**0.25 * iou**0.75), 0.01)
    expected = -t * torch.log(p) - (1 - t) * torch.log(1 - p)
    assert torch.isclose(losses["loss_ce"], expected, atol=1e-6)
    assert torch.isclose(losses["loss_bbox"], torch.tensor(0.2), atol=1e-6)
    assert torch.isclose(losses["loss_giou"], torch.tensor(0.5), atol=1e-6)  # 1 - (IoU 0.5 - 0/hull)


def test_images_without_objects_are_safe_and_keep_every_output_in_the_graph():
    out, targets = _case([0, 0], aux=1)
    _requires_grad(out)
    crit = _criterion()
    losses = crit(out, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_mask_dice_enc"] == 0
    assert losses["loss_ce"] > 0  # every query is a negative
    crit.total_loss(losses).backward()
    assert all(leaf.grad is not None for leaf in leaves(out))  # DDP: no parameter left without a gradient


def test_batched_losses_equal_the_sum_of_per_image_losses_with_mixed_mask_sizes():
    sizes, gt_hw = [2, 0, 3], [(20, 28), (8, 8), (31, 17)]
    out, targets = _case(sizes, seed=3, gt_hw=gt_hw)
    crit = _criterion()
    batched = crit(out, targets)
    total_boxes = sum(sizes) * GROUPS
    singles = [crit(_slice(out, b), targets[b : b + 1]) for b in range(len(sizes))]
    for key, value in batched.items():
        # Un-normalise each image's loss by its own num_boxes (clamped to 1 for the image without objects,
        # whose queries still add class-loss negatives).
        unnormalised = sum(single[key] * max(n * GROUPS, 1) for single, n in zip(singles, sizes))
        assert torch.allclose(value * total_boxes, unnormalised, rtol=1e-5), key


def test_dense_and_lazy_mask_outputs_give_the_same_losses():
    out, targets = _case([2, 3], seed=4)
    dense = {k: v for k, v in out.items()}

    def densify(layer):
        pm = layer["pred_masks"]
        d = torch.einsum("bchw,bqc->bqhw", pm["spatial_features"], pm["query_features"]) + pm["bias"]
        return {**layer, "pred_masks": d}

    dense = densify(out)
    dense["aux_outputs"] = [densify(a) for a in out["aux_outputs"]]
    dense["enc_outputs"] = densify(out["enc_outputs"])
    crit = _criterion()
    matches = crit.match(out, targets)
    a, b = crit(out, targets, matches=matches), crit(dense, targets, matches=matches)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


def test_fixed_matches_are_used_as_given():
    out, targets = _case([2], aux=0)
    crit = _criterion()
    own = crit.match(out, targets)
    # Swap the two objects of group 0: a worse assignment must give a higher weighted loss.
    (q, t) = own[0].per_image()[0]
    swapped_t = t.clone()
    swapped_t[:2] = t[:2].flip(0)
    forced = [LayerMatches.from_per_image([(q, swapped_t)], [2], torch.device("cpu")), own[1]]
    better, worse = crit(out, targets, matches=own), crit(out, targets, matches=forced)
    assert crit.total_loss(worse) > crit.total_loss(better)
    with pytest.raises(ValueError, match="layer matches"):
        crit(out, targets, matches=own[:1])


def test_nan_outputs_give_a_detectable_non_finite_loss():
    out, targets = _case([2, 1])
    out["aux_outputs"][0]["pred_logits"][0, 3, 1] = float("nan")
    crit = _criterion()
    losses = crit(out, targets)  # the matcher must survive the NaN cost
    assert not torch.isfinite(crit.total_loss(losses))
    assert torch.isfinite(losses["loss_ce"]) and not torch.isfinite(losses["loss_ce_0"])
    out, targets = _case([2, 1])
    out["pred_masks"]["spatial_features"][:] = float("nan")
    assert not torch.isfinite(crit.total_loss(crit(out, targets)))


def test_half_precision_outputs_under_autocast_give_float32_losses():
    out, targets = _case([2, 1], seed=5)
    ref = _criterion()(out, targets)

    def to_bf16(node):
        if isinstance(node, dict):
            return {k: to_bf16(v) for k, v in node.items()}
        if isinstance(node, list):
            return [to_bf16(v) for v in node]
        return node.to(torch.bfloat16)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _criterion()(to_bf16(out), targets)
    for key in ref:
        assert low[key].dtype == torch.float32
        assert torch.allclose(low[key], ref[key], rtol=0.1, atol=0.05), key


def test_bad_inputs_raise_clear_errors():
    out, targets = _case([1])
    with pytest.raises(TargetFormatError, match="class slots"):
        build_criterion(K + 1, GROUPS)(out, targets)
    with pytest.raises(TargetFormatError, match="pred_boxes"):
        _criterion()({"pred_logits": out["pred_logits"]}, targets)
    with pytest.raises(TargetFormatError, match="masks"):
        _criterion()(out, [{"labels": targets[0]["labels"], "boxes": targets[0]["boxes"]}])
    no_masks = {k: v for k, v in out.items() if k != "pred_masks"}
    with pytest.raises(TargetFormatError, match="pred_masks"):
        _criterion()(no_masks, targets)
    with pytest.raises(ValueError):
        SetCriterion(0)


def _num_boxes_worker(rank, world, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        crit = build_criterion(K, GROUPS)
        sizes = [[3, 1], [0, 0]][rank]  # rank 0 holds 4 objects, rank 1 none
        _, targets = _case(sizes, seed=rank)
        value = crit.num_boxes(crit_batch(targets), torch.device("cpu"))
        torch.save(value, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_num_boxes_is_averaged_over_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_num_boxes_worker, args=(2, tmp_path / "init", tmp_path / "out"), nprocs=2, join=True)
    values = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    assert values[0] == values[1] == 4 * GROUPS / 2  # (4 objects x 2 groups + 0) / 2 processes


@pytest.mark.gpu
def test_cuda_losses_equal_cpu_losses_and_take_one_host_sync():
    import warnings

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    out, targets = _case([2, 0, 3], seed=6)
    crit = _criterion()
    matches = crit.match(out, targets)
    on_cpu = crit(out, targets, matches=matches)
    out_gpu, targets_gpu = to_device(out, device), [to_device(t, device) for t in targets]
    for on_device, reference in zip(crit.match(out_gpu, targets_gpu), matches):  # same points: same matching
        assert torch.equal(on_device.query_idx.cpu(), reference.query_idx)
        assert torch.equal(on_device.target_idx.cpu(), reference.target_idx)
    gpu_matches = [
        LayerMatches(
            m.batch_idx.to(device),
            m.query_idx.to(device),
            m.target_idx.to(device),
            m.flat_target_idx.to(device),
            m.counts,
        )
        for m in matches
    ]
    on_gpu = crit(out_gpu, targets_gpu, matches=gpu_matches)
    for key, value in on_cpu.items():
        assert torch.allclose(on_gpu[key].cpu(), value, rtol=1e-4, atol=1e-6), key

    default = build_criterion(K, GROUPS)  # samplers draw on the device
    default(out_gpu, targets_gpu)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = default(out_gpu, targets_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in caught) == 1
    assert torch.isfinite(default.total_loss(losses))
