"""The layer-batched criterion pass equals the per-layer pass: values, gradients and random draws."""

from __future__ import annotations

import pytest
import torch
from criterion_cases import criterion_case, leaves

from rfdetr_train.losses import build_criterion
from rfdetr_train.losses.layer_batch import can_batch_layers

K, C, GROUPS, Q = 4, 8, 3, 6


def _case(sizes, seed, aux=3, dense=False):
    return criterion_case(
        sizes,
        seed,
        slots=K,
        queries=GROUPS * Q,
        channels=C,
        aux=aux,
        mask_hw=(12, 16),
        gt_hw=lambda i: (24 + 4 * i, 30),
        dense=dense,
        logits_first=False,
    )


def _clone_with_grad(node):
    if isinstance(node, dict):
        return {k: _clone_with_grad(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_clone_with_grad(v) for v in node]
    return node.clone().requires_grad_(True)


def _run(outputs, targets, batch_layers, seed):
    crit = build_criterion(K, GROUPS)  # default samplers: uniform matcher points, importance loss points
    crit.batch_layers = batch_layers
    outputs = _clone_with_grad(outputs)
    torch.manual_seed(seed)
    losses = crit(outputs, targets)
    after = torch.rand(3)  # both passes must leave the global RNG at the same place
    crit.total_loss(losses).backward()
    return losses, [leaf.grad for leaf in leaves(outputs)], after


@pytest.mark.parametrize(
    ("sizes", "dense"), [((3, 1, 7), False), ((2, 9), True), ((0, 4, 1, 5), False), ((6,), False)]
)
def test_batched_pass_equals_the_per_layer_pass(sizes, dense):
    outputs, targets = _case(sizes, seed=len(sizes), dense=dense)
    crit = build_criterion(K, GROUPS)
    layers = [out for _, out in crit.layers(outputs)]
    assert can_batch_layers(layers, crit.match(outputs, targets))  # the batched pass is what runs
    per_layer, per_layer_grads, per_layer_rng = _run(outputs, targets, False, seed=11)
    batched, batched_grads, batched_rng = _run(outputs, targets, True, seed=11)
    assert list(batched) == list(per_layer)  # same keys in the same order
    assert len(batched) == 5 * 5
    for key, value in per_layer.items():
        assert batched[key].dtype == torch.float32
        torch.testing.assert_close(batched[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert torch.equal(batched_rng, per_layer_rng)  # same random draws, in the same order
    for mine, reference in zip(batched_grads, per_layer_grads):
        scale = reference.abs().max().clamp(min=1e-6)
        assert (mine - reference).abs().max() <= 1e-6 * scale


def test_layers_of_different_shapes_or_no_objects_take_the_per_layer_pass():
    outputs, targets = _case((2, 3), seed=0)
    crit = build_criterion(K, GROUPS)
    matches = crit.match(outputs, targets)
    layers = [out for _, out in crit.layers(outputs)]
    assert can_batch_layers(layers, matches)
    smaller = dict(layers[-1])
    smaller["pred_masks"] = {k: v for k, v in smaller["pred_masks"].items()}
    smaller["pred_masks"]["spatial_features"] = smaller["pred_masks"]["spatial_features"][..., :-2]
    assert not can_batch_layers(layers[:-1] + [smaller], matches)
    assert not can_batch_layers(layers[:1], matches[:1])
    empty_out, empty_targets = _case((0, 0), seed=1)
    assert not can_batch_layers(layers, crit.match(empty_out, empty_targets))
    losses = crit(empty_out, empty_targets)  # the per-layer pass: zeros that keep every output in the graph
    assert all(float(v) == 0.0 for k, v in losses.items() if k.startswith("loss_bbox"))


@pytest.mark.parametrize("dense", [False, True])
def test_matcher_mask_costs_of_all_layers_at_once_equal_layer_by_layer(dense):
    from rfdetr_train.losses import TargetBatch

    outputs, targets = _case((3, 0, 5), seed=7, dense=dense)
    crit = build_criterion(K, GROUPS)
    layers = [out for _, out in crit.layers(outputs)]
    batch = TargetBatch.from_targets(targets, torch.device("cpu"), need_masks=True)
    torch.manual_seed(5)
    together = crit.matcher.cost_matrices(layers, batch)  # [L, B, GQ, Tmax]
    torch.manual_seed(5)  # the same points: one sampler call per layer, in layer order
    one_by_one = torch.stack([crit.matcher.cost_matrices([out], batch)[0] for out in layers])
    torch.testing.assert_close(together, one_by_one, rtol=1e-6, atol=1e-6)
