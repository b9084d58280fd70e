"""Optimiser groups (layer-wise decay, no-decay rule), AdamW choice, and the LR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rfdetr_train.engine.optim import OptimSettings, backbone_layer_id, build_optimizer, param_groups
from rfdetr_train.engine.schedule import LRSchedule


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 4)
        self.ls1 = nn.Parameter(torch.ones(4))


class _Toy(nn.Module):
    """Mimics the key layout of rfdetr_core.models.RFDETRModel."""

    def __init__(self, blocks=3):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.backbone.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.backbone.patch_embed = nn.Conv2d(3, 4, 2)
        self.backbone.blocks = nn.ModuleList(_Block() for _ in range(blocks))
        self.backbone.norm = nn.LayerNorm(4)
        self.projector = nn.Linear(4, 4)
        self.decoder = nn.Module()
        self.decoder.linear1 = nn.Linear(4, 4)
        self.class_embed = nn.Linear(4, 3)
        self.query_feat = nn.Embedding(6, 4)


SETTINGS = OptimSettings(lr=1e-4, lr_encoder=1.5e-4, layer_decay=0.8, component_decay=0.7, weight_decay=1e-4)


def _lr_and_wd(model, groups):
    by_param = {}
    for g in groups:
        for p in g["params"]:
            by_param[id(p)] = (g["lr"], g["weight_decay"])
    return {n: by_param[id(p)] for n, p in model.named_parameters()}


def test_layer_ids_follow_upstream_rule():
    n = 13  # seg variants: max(out_feature_indexes) + 1
    assert backbone_layer_id("cls_token", n) == 0
    assert backbone_layer_id("pos_embed", n) == 0
    assert backbone_layer_id("patch_embed.weight", n) == 0
    assert backbone_layer_id("blocks.0.mlp.fc1.weight", n) == 1
    assert backbone_layer_id("blocks.11.norm1.weight", n) == 12
    assert backbone_layer_id("norm.weight", n) == 14
    # upstream's key layout gives the same ids
    assert backbone_layer_id("encoder.encoder.layer.11.norm1.weight", n) == 12
    assert backbone_layer_id("encoder.embeddings.position_embeddings", n) == 0


def test_groups_learning_rates_and_weight_decay():
    model = _Toy(blocks=3)
    n = 4  # toy: out indexes up to 3
    groups = param_groups(model, SETTINGS, num_layers=n)
    table = _lr_and_wd(model, groups)
    enc = "backbone."
    base = 1.5e-4 * 0.7**2
    # block i -> layer id i+1 -> 0.8 ** (n + 1 - (i + 1))
    assert table[enc + "blocks.2.mlp.weight"][0] == pytest.approx(base * 0.8 ** (n - 2))
    assert table[enc + "blocks.0.mlp.weight"][0] == pytest.approx(base * 0.8**n)
    assert table[enc + "pos_embed"][0] == pytest.approx(base * 0.8 ** (n + 1))
    assert table[enc + "norm.weight"][0] == pytest.approx(base)
    assert table["decoder.linear1.weight"][0] == pytest.approx(1e-4 * 0.7)
    assert table["projector.weight"][0] == pytest.approx(1e-4)
    assert table["class_embed.weight"][0] == pytest.approx(1e-4)
    # decay only on matrices that are not norms / embeddings
    assert table[enc + "blocks.0.mlp.weight"][1] == 1e-4
    assert table["class_embed.weight"][1] == 1e-4
    for name in (
        enc + "blocks.0.mlp.bias",
        enc + "blocks.0.norm1.weight",
        enc + "pos_embed",
        enc + "patch_embed.weight",
        enc + "cls_token",
        enc + "blocks.1.ls1",
        "query_feat.weight",
        "class_embed.bias",
    ):
        assert table[name][1] == 0.0, name
    # every trainable parameter exactly once; identical settings merged
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    keys = [(g["lr"], g["weight_decay"], g["name"]) for g in groups]
    assert len(keys) == len(set(keys))


def test_frozen_parameters_are_left_out_and_optimizer_builds():
    model = _Toy()
    model.class_embed.weight.requires_grad_(False)
    groups = param_groups(model, SETTINGS, num_layers=4)
    assert all(p is not model.class_embed.weight for g in groups for p in g["params"])
    opt = build_optimizer(groups, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]  # the fused kernel on CPU too
    assert all(g["base_lr"] == g["lr"] for g in opt.param_groups)


def test_step_schedule_with_warmup_and_drop():
    s = LRSchedule("step", total_steps=100, warmup_steps=4, lr_drop_steps=50)
    assert [s.factor(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert s.factor(49) == 1.0 and s.factor(50) == 0.1 and s.factor(99) == 0.1


def test_cosine_schedule_ends_at_floor_and_applies_per_group():
    s = LRSchedule("cosine", total_steps=110, warmup_steps=10, min_factor=0.1)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.factor(110) == pytest.approx(0.1)
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "base_lr": 1.0}, {"params": [p2], "base_lr": 0.5}], lr=1.0)
    s.apply(opt, 0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05])
