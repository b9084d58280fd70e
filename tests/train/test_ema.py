"""EMA of the weights: warmed-up decay, buffers, tied weights, exact formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rfdetr_train.engine.ema import ModelEMA


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return m


def test_decay_warms_up_like_upstream():
    ema = ModelEMA(_model(), decay=0.993, tau=100)
    # upstream counts the first update as update 1: 0.993 * (1 - exp(-1/100))
    assert ema.current_decay() == pytest.approx(0.993 * (1 - math.exp(-1 / 100)))
    ema.updates = 1000
    assert ema.current_decay() == pytest.approx(0.993 * (1 - math.exp(-1001 / 100)))
    assert ModelEMA(_model(), decay=0.9, tau=0).current_decay() == 0.9


def test_update_matches_reference_formula_for_params_and_buffers():
    model = _model()
    ema = ModelEMA(model, decay=0.9, tau=5)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked += 7
    d = ema.update(model)
    assert d == pytest.approx(0.9 * (1 - math.exp(-1 / 5)))
    after = ema.module.state_dict()
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(after[key], d * before[key] + (1 - d) * value)
        else:
            assert torch.equal(after[key], value)  # integer buffers copied
    assert ema.updates == 1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_tied_weights_are_blended_once():
    model = nn.Module()
    model.a = nn.Linear(2, 2, bias=False)
    model.b = model.a  # the same module under two names
    ema = ModelEMA(model, decay=0.5, tau=0)
    start = ema.module.a.weight.clone()
    with torch.no_grad():
        model.a.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.a.weight, 0.5 * start + 0.5 * model.a.weight)


def test_set_and_state_roundtrip():
    model = _model()
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.mul_(3)
    ema.set(model)
    assert torch.equal(ema.module[0].weight, model[0].weight)
    other = ModelEMA(_model(), decay=0.9)
    other.load_state_dict(ema.state_dict(), updates=12)
    assert other.updates == 12 and torch.equal(other.module[0].weight, model[0].weight)


def test_repeated_updates_follow_in_place_changes_and_a_new_model_object():
    model = _model()
    ema = ModelEMA(model, decay=0.8, tau=0)
    expected = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for other in (model, model, _model(), model):  # the tensor lists are reused only for the same object
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.5).add_(0.25)  # in place, as the optimiser updates
            other[1].num_batches_tracked += 3
        ema.update(other)
        for key, value in other.state_dict().items():
            if value.dtype.is_floating_point:
                expected[key] = 0.8 * expected[key] + 0.2 * value
            else:
                expected[key] = value.clone()
        for key, value in ema.module.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)


def test_a_model_in_another_dtype_is_cast_on_every_update():
    model = _model()
    ema = ModelEMA(model, decay=0.5, tau=0)
    half = _model().double()
    ema.update(half)
    with torch.no_grad():
        half[0].weight.add_(1.0)
    before = ema.module[0].weight.clone()
    ema.update(half)  # the cast copy of the first update must not be reused
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before + 0.5 * half[0].weight.float())
