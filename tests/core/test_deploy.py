"""DeployModel: torch.export with a dynamic batch, outputs equal to eager predict's raw outputs, and the
graph-safe post-processing half equal to today's selection rule (issue 13)."""

from __future__ import annotations

import warnings

import pytest
import torch

from rfdetr_core.deploy import DeployModel, check_input
from rfdetr_core.errors import InvalidResolutionError
from rfdetr_core.factory import load_model
from rfdetr_core.postprocess import select_detections, select_topk


def _loaded(variant: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(variant)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "postprocess"),
    [("seg-tiny", False), ("seg-tiny", True), ("seg-nano", True)],  # nano raw: covered through its top K
)
def test_exported_deploy_model_equals_eager(variant, postprocess):
    loaded = _loaded(variant)
    card = loaded.card
    h, w = card.resolution
    deploy = DeployModel(loaded.model, card, postprocess=postprocess)
    batch = torch.export.Dim("batch", min=1, max=8)
    example = torch.randn(2, 3, h, w)
    exported = torch.export.export(deploy, (example,), dynamic_shapes=({0: batch},)).module()
    for b in (1, 2, 3):
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            eager = loaded.model(x)  # what RFDETR.predict runs (eval output dict)
            got = exported(x)
        if not postprocess:
            assert deploy.output_names == ("pred_logits", "pred_boxes", "pred_masks")
            for name, t in zip(deploy.output_names, got, strict=True):
                assert t.shape == eager[name].shape
                assert _rel_err(t, eager[name]) <= 1e-5, (variant, b, name)
            continue
        ref = select_detections(
            eager["pred_logits"],
            eager["pred_boxes"],
            eager["pred_masks"],
            deploy.slot_category,
            deploy.num_select,
        )
        assert deploy.output_names == ("scores", "labels", "boxes", "masks")
        assert got[0].shape == (b, card.default_num_select)
        assert torch.equal(got[1], ref[1])  # same pairs, same labels
        for t, want in zip(got, ref, strict=True):
            assert t.shape == want.shape and _rel_err(t.float(), want.float()) <= 1e-5, (variant, b)


def test_deploy_model_is_group_zero_only_and_shares_weights():
    loaded = _loaded("seg-tiny")
    model, card = loaded.model, loaded.card
    deploy = DeployModel(model, card, postprocess=False)
    sd = deploy.state_dict()
    assert sd["net.query_feat.weight"].shape[0] == card.num_queries < model.query_feat.weight.shape[0]
    assert not any(k.startswith("net.query_selection.proj.1.") for k in sd)
    assert sd["pos_table"].shape[1] == 1 + (card.resolution[0] // 16) * (card.resolution[1] // 16)
    assert deploy.net.backbone is model.backbone  # shared, not copied
    assert model.query_selection.proj[1] is not None and len(model.query_selection.proj) == model.group_detr
    x = torch.randn(1, 3, *card.resolution)
    with torch.no_grad():
        got, want = deploy(x), model(x)
    for name, t in zip(deploy.output_names, got, strict=True):
        torch.testing.assert_close(t, want[name], rtol=0, atol=0)


def test_check_input_at_the_boundary():
    card = _loaded("seg-tiny").card
    check_input(torch.zeros(2, 3, *card.resolution), card)
    with pytest.raises(InvalidResolutionError, match="runs at 160x160"):
        check_input(torch.zeros(1, 3, 128, 160), card)
    with pytest.raises(InvalidResolutionError, match=r"\[B, 3, H, W\]"):
        check_input(torch.zeros(3, 160, 160), card)


def _stable_reference(logits: torch.Tensor, k: int):
    """Today's (0.1.0) rule: a stable descending argsort of the flattened sigmoid scores."""
    b, _, s = logits.shape
    probs = logits.sigmoid().reshape(b, -1)
    order = torch.argsort(probs, dim=1, descending=True, stable=True)[:, :k]
    return probs.gather(1, order), order % s, order // s


@pytest.mark.parametrize(("q", "s", "k"), [(30, 91, 30), (300, 91, 300), (7, 3, 21), (50, 4, 13)])
def test_graph_safe_selection_equals_todays_rule(q, s, k):
    g = torch.Generator().manual_seed(q * s + k)
    logits = torch.randn(3, q, s, generator=g) * 4  # no ties
    for got, want in zip(select_topk(logits, k), _stable_reference(logits, k), strict=True):
        assert torch.equal(got, want)
    # with ties (integer logits: many equal scores, straddling the k-th place): still today's order
    tied = torch.randint(-3, 3, (3, q, s), generator=g).float()
    for got, want in zip(select_topk(tied, k), _stable_reference(tied, k), strict=True):
        assert torch.equal(got, want)


def test_selection_dtype_selects_in_float32_after_a_bf16_network():
    """``RFDETR.optimize``'s captured module: a bf16 network, then the selection on float32 casts of its raw
    outputs, exactly as eager predict selected on the fast path before (``select_detections`` of ``.float()``)."""
    loaded = _loaded("seg-tiny")
    card = loaded.card
    net = loaded.model.to(torch.bfloat16)
    raw = DeployModel(net, card, postprocess=False)
    fast = DeployModel(net, card, num_select=card.num_queries, selection_dtype=torch.float32)
    x = torch.randn(2, 3, *card.resolution, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.inference_mode():
        logits, boxes, masks = (t.float() for t in raw(x))
        want = select_detections(logits, boxes, masks, raw.slot_category, card.num_queries)
        got = fast(x)
    assert got[0].dtype == torch.float32 and got[3].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_deploy_buffers_live_on_the_models_device():
    # a CUDA graph cannot capture a host-to-device copy, so no buffer may start on the host (meta stands in
    # for the GPU here)
    loaded = _loaded("seg-tiny")
    deploy = DeployModel(loaded.model.to("meta"), loaded.card)
    assert {name: b.device.type for name, b in deploy.named_buffers() if "." not in name} == {
        "pos_table": "meta",
        "slot_category": "meta",
    }
