"""Weight conversion without the upstream package: DINOv2 backbone files (both layouts) and malformed inputs.

Upstream RF-DETR conversion is exercised against the real upstream models in ``test_parity_upstream.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rfdetr_core  # noqa: F401
from rfdetr_core.errors import CheckpointError
from rfdetr_core.factory import build_model
from rfdetr_core.weights.dinov2 import convert_dinov2_state_dict, resize_patch_kernel
from rfdetr_core.weights.upstream import convert_upstream_state_dict

DIM, DEPTH, PATCH, GRID = 192, 4, 14, 5  # a small ViT in DINOv2's layouts, as wide as seg-tiny's encoder


def _hub_dinov2(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, DIM),
        "pos_embed": r(1, 1 + GRID * GRID, DIM),
        "mask_token": r(1, DIM),
        "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(DIM),
        "norm.weight": r(DIM),
        "norm.bias": r(DIM),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": r(DIM),
            p + "norm1.bias": r(DIM),
            p + "attn.qkv.weight": r(3 * DIM, DIM),
            p + "attn.qkv.bias": r(3 * DIM),
            p + "attn.proj.weight": r(DIM, DIM),
            p + "attn.proj.bias": r(DIM),
            p + "ls1.gamma": r(DIM),
            p + "norm2.weight": r(DIM),
            p + "norm2.bias": r(DIM),
            p + "mlp.fc1.weight": r(4 * DIM, DIM),
            p + "mlp.fc1.bias": r(4 * DIM),
            p + "mlp.fc2.weight": r(DIM, 4 * DIM),
            p + "mlp.fc2.bias": r(DIM),
            p + "ls2.gamma": r(DIM),
        }
    return sd


def _as_hugging_face(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {
        "embeddings.cls_token": hub["cls_token"],
        "embeddings.mask_token": hub["mask_token"],
        "embeddings.position_embeddings": hub["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": hub["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": hub["patch_embed.proj.bias"],
        "layernorm.weight": hub["norm.weight"],
        "layernorm.bias": hub["norm.bias"],
    }
    for i in range(DEPTH):
        h, p = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = hub[h + f"attn.qkv.{kind}"].chunk(3)
            sd |= {
                p + f"attention.attention.query.{kind}": q,
                p + f"attention.attention.key.{kind}": k,
                p + f"attention.attention.value.{kind}": v,
                p + f"attention.output.dense.{kind}": hub[h + f"attn.proj.{kind}"],
                p + f"norm1.{kind}": hub[h + f"norm1.{kind}"],
                p + f"norm2.{kind}": hub[h + f"norm2.{kind}"],
                p + f"mlp.fc1.{kind}": hub[h + f"mlp.fc1.{kind}"],
                p + f"mlp.fc2.{kind}": hub[h + f"mlp.fc2.{kind}"],
            }
        sd[p + "layer_scale1.lambda1"] = hub[h + "ls1.gamma"]
        sd[p + "layer_scale2.lambda1"] = hub[h + "ls2.gamma"]
    return {f"dinov2.{k}": v for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny():
    return build_model("seg-tiny")


def test_hub_layout_fills_the_whole_backbone(tiny):
    hub = _hub_dinov2()
    sd, notes = convert_dinov2_state_dict(hub, tiny.spec)
    tiny.backbone.load_state_dict(sd, strict=True)  # every backbone tensor is provided
    torch.testing.assert_close(tiny.backbone.blocks[2].attn.qkv.weight, hub["blocks.2.attn.qkv.weight"])
    torch.testing.assert_close(tiny.backbone.blocks[3].ls2, hub["blocks.3.ls2.gamma"])
    grid = tiny.backbone.pos_grid
    assert any("14 to 16" in n for n in notes) and any(f"5x5 to {grid}x{grid}" in n for n in notes)


def test_hugging_face_layout_gives_the_same_weights(tiny):
    hub = _hub_dinov2(seed=1)
    a, _ = convert_dinov2_state_dict(hub, tiny.spec)
    b, _ = convert_dinov2_state_dict(_as_hugging_face(hub), tiny.spec)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_extra_blocks_are_dropped_and_unknown_entries_reported(tiny):
    hub = _hub_dinov2()
    extra = {k.replace("blocks.0.", "blocks.7."): v for k, v in hub.items() if k.startswith("blocks.0.")}
    hub |= extra | {"head.weight": torch.zeros(10, DIM)}
    sd, notes = convert_dinov2_state_dict(hub, tiny.spec)
    assert not any(k.startswith("blocks.7.") for k in sd)
    assert any("head.weight" in n for n in notes)


@pytest.mark.parametrize("size", [12, 16, 20])
def test_patch_kernel_resize_preserves_token_embeddings(size):
    """FlexiViT: <resize(x), resize_kernel(w)> == <x, w> for any 14x14 patch x (exact when enlarging)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 14, 14, generator=g, dtype=torch.float64)
    x = torch.randn(5, 3, 14, 14, generator=g, dtype=torch.float64)
    w_new = resize_patch_kernel(w, size)
    x_new = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    before = torch.einsum("ncij,kcij->nk", x, w)
    after = torch.einsum("ncij,kcij->nk", x_new, w_new)
    if size > 14:
        torch.testing.assert_close(after, before)
    else:  # shrinking loses information: only a least-squares fit, but it must still track the original
        assert F.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.5


def test_wrong_width_is_an_error_naming_the_file_to_use():
    model = build_model("seg-nano")  # ViT-S, 384 wide
    with pytest.raises(CheckpointError, match="dinov2_vits14"):
        convert_dinov2_state_dict(_hub_dinov2(), model.spec)


def test_not_a_dinov2_file_is_an_error(tiny):
    with pytest.raises(CheckpointError, match="DINOv2"):
        convert_dinov2_state_dict({"weight": torch.zeros(3)}, tiny.spec)


def test_not_an_rfdetr_file_is_an_error(tiny):
    with pytest.raises(CheckpointError, match="RF-DETR checkpoint"):
        convert_upstream_state_dict(_hub_dinov2(), tiny.spec)
