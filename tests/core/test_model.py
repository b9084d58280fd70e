"""The RF-DETR(-Seg) network: shapes for every variant, windowing, batch independence, training outputs, errors."""

from __future__ import annotations

import pytest
import torch

import rfdetr_core  # noqa: F401  (registers torch.ops.rfdetr)
from rfdetr_core.errors import InvalidResolutionError
from rfdetr_core.factory import build_model
from rfdetr_core.models.backbone import WindowedViT
from rfdetr_core.predict import RFDETR
from rfdetr_core.variants import get_variant, list_variants


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("seg-tiny").eval()


@pytest.mark.parametrize("name", list_variants())
def test_every_variant_builds_and_gives_eval_shapes(name):
    v = get_variant(name)
    model = build_model(name).eval()
    assert model.spec.name == v.name
    assert model.num_slots == v.num_classes + 1
    assert (model.num_queries, model.group_detr, model.is_segmentation) == (
        v.num_queries,
        v.group_detr,
        v.is_segmentation,
    )
    # Only the blocks whose output is read are built (e.g. 11 for the legacy Base, whose stage 12 is unused).
    assert len(model.backbone.blocks) == max(v.out_feature_indexes)
    # Small non-square input keeps the big ViT-B variants cheap.
    h, w = 2 * v.size_multiple, 3 * v.size_multiple
    with torch.no_grad():
        out = model(_images(1, h, w))
    q, k = v.num_queries, v.num_classes + 1
    expected = {"pred_logits": (1, q, k), "pred_boxes": (1, q, 4)}
    if v.is_segmentation:
        expected["pred_masks"] = (1, q, h // 4, w // 4)
    assert {key: tuple(t.shape) for key, t in out.items()} == expected
    assert all(torch.isfinite(t).all() for t in out.values())


def test_seg_tiny_honours_its_variant_fields(tiny):
    v = get_variant("seg-tiny")
    assert tiny.backbone.dim == v.encoder_dim and len(tiny.backbone.blocks) == v.encoder_depth
    assert tiny.backbone.blocks[0].attn.heads == v.encoder_heads
    assert tiny.backbone.out_feature_indexes == v.out_feature_indexes
    assert tiny.backbone.pos_embed.shape == (1, 1 + v.positional_encoding_size**2, v.encoder_dim)
    assert tiny.projector.levels[0].c2f.cv1.conv.in_channels == v.encoder_dim * len(v.out_feature_indexes)
    assert len(tiny.decoder.layers) == v.dec_layers
    assert tiny.decoder.layers[0].linear1.out_features == v.dim_feedforward
    assert tiny.decoder.layers[0].self_attn.heads == v.sa_nheads
    assert tiny.decoder.layers[0].cross_attn.heads == v.ca_nheads
    assert tiny.decoder.layers[0].cross_attn.points == v.dec_n_points
    assert tiny.query_feat.weight.shape == (v.num_queries * v.group_detr, v.hidden_dim)
    assert len(tiny.query_selection.proj) == v.group_detr
    assert len(tiny.mask_head.blocks) == v.dec_layers


def test_default_size_and_non_square(tiny):
    m = tiny.spec.size_multiple
    with torch.no_grad():
        square = tiny(_images(1, 12 * m, 12 * m))
        wide = tiny(_images(1, 8 * m, 20 * m))
    q = tiny.num_queries
    assert square["pred_masks"].shape == (1, q, 3 * m, 3 * m)
    assert wide["pred_masks"].shape == (1, q, 2 * m, 5 * m)
    assert wide["pred_boxes"].shape == (1, q, 4)


def test_batch_independence(tiny):
    m = tiny.spec.size_multiple
    images = _images(3, 12 * m, 10 * m, seed=1)
    with torch.no_grad():
        together = tiny(images)
        alone = [tiny(images[i : i + 1]) for i in range(3)]
    for key in together:
        torch.testing.assert_close(together[key], torch.cat([a[key] for a in alone]), atol=1e-4, rtol=1e-4)


def test_invalid_resolution_names_nearest_sizes(tiny):
    """The size check sits at the boundary users pass sizes through (predict here, training in
    test_engine); the network itself refuses a wrong size with a plain ValueError."""
    m = tiny.spec.size_multiple
    with pytest.warns(UserWarning, match="untrained"):
        with pytest.raises(InvalidResolutionError, match=rf"Nearest valid sizes: .*{12 * m}, {13 * m}"):
            RFDETR("seg-tiny", device="cpu", resolution=(12 * m + 1, 12 * m))
        with pytest.raises(InvalidResolutionError, match="312, 324"):
            RFDETR("seg-nano", device="cpu", resolution=(312, 313))
    with pytest.raises(
        ValueError, match=rf"seg-tiny: input {12 * m + 1}x{12 * m} is not a multiple of {m}"
    ) as err:
        tiny(_images(1, 12 * m + 1, 12 * m))
    assert f"nearest valid sizes for {12 * m + 1}: {11 * m}, {12 * m}, {13 * m}, {14 * m}." in str(err.value)


def test_windowed_blocks_equal_each_window_run_as_its_own_image():
    """All-windowed 2x2 ViT on an image == a 1-window ViT on each quadrant crop, given the matching position rows."""
    torch.manual_seed(0)
    grid = 6  # 96 px at patch 16: 2x2 windows of 3x3 patches
    big = WindowedViT(64, 4, 16, 2, grid, (1, 3), window_block_indexes=(0, 1, 2)).eval()
    small = WindowedViT(64, 4, 16, 1, grid // 2, (1, 3), window_block_indexes=(0, 1, 2)).eval()
    small.load_state_dict({k: v for k, v in big.state_dict().items() if k != "pos_embed"}, strict=False)
    image = _images(1, 96, 96, seed=2)
    table = big.pos_embed.detach()[0, 1:].view(grid, grid, -1)
    with torch.no_grad():
        maps = big(image)
        for wy in range(2):
            for wx in range(2):
                rows = table[3 * wy : 3 * wy + 3, 3 * wx : 3 * wx + 3].reshape(9, -1)
                small.pos_embed.copy_(torch.cat([big.pos_embed[:, :1], rows[None]], dim=1))
                crop = image[..., 48 * wy : 48 * wy + 48, 48 * wx : 48 * wx + 48]
                for full, part in zip(maps, small(crop), strict=True):
                    torch.testing.assert_close(
                        full[..., 3 * wy : 3 * wy + 3, 3 * wx : 3 * wx + 3], part, atol=1e-5, rtol=1e-5
                    )


def test_global_blocks_mix_windows():
    """A global block makes a window's output depend on the other windows; a windowed block does not."""
    torch.manual_seed(0)
    windowed = WindowedViT(32, 2, 16, 2, 4, (1,), window_block_indexes=(0,)).eval()
    glob = WindowedViT(32, 2, 16, 2, 4, (1,), window_block_indexes=()).eval()
    glob.load_state_dict(windowed.state_dict())
    a = _images(1, 64, 64, seed=3)
    b = a.clone()
    b[..., 32:, 32:] += 1.0  # change only the bottom-right window
    with torch.no_grad():
        for model, mixes in ((windowed, False), (glob, True)):
            top_left_a = model(a)[0][..., :2, :2]
            top_left_b = model(b)[0][..., :2, :2]
            assert (not torch.allclose(top_left_a, top_left_b, atol=1e-6)) == mixes


@pytest.mark.parametrize("fold", [None, True])  # None: CPU default (projected maps); True: CUDA default
def test_training_outputs_are_grouped_and_lazy(tiny, fold):
    model = build_model("seg-tiny").train()
    model.load_state_dict(tiny.state_dict())
    model.mask_head.fold_in_training = fold
    m = model.spec.size_multiple
    images = _images(2, 8 * m, 10 * m, seed=4)
    out = model(images)
    g, q, k, c = model.group_detr, model.num_queries, model.num_slots, model.spec.hidden_dim
    assert out["pred_logits"].shape == (2, g * q, k) and out["pred_boxes"].shape == (2, g * q, 4)
    assert len(out["aux_outputs"]) == model.spec.dec_layers - 1
    entries = [out, *out["aux_outputs"], out["enc_outputs"]]
    for entry in entries:
        masks = entry["pred_masks"]
        assert set(masks) == {"spatial_features", "query_features", "bias"}
        assert masks["spatial_features"].shape == (2, c, 2 * m, 10 * m // 4)
        assert masks["query_features"].shape == (2, g * q, c)
        assert masks["bias"].shape == ((2, g * q) if fold else (1,))
        assert entry["pred_logits"].shape == (2, g * q, k)
    # Everything trains: a loss over all outputs reaches every parameter.
    loss = sum(
        e["pred_logits"].sigmoid().mean()
        + e["pred_boxes"].mean()
        + (
            e["pred_masks"]["query_features"].mean(1) @ e["pred_masks"]["spatial_features"].mean((2, 3)).T
        ).trace()
        + e["pred_masks"]["bias"].sum()
        for e in entries
    )
    loss.backward()
    frozen = [n for n, p in model.named_parameters() if p.grad is None]
    assert frozen == []

    # Group 0 of the last layer, made dense from the lazy entry, equals the eval-mode output.
    with torch.no_grad():
        train_out = model(images)
        eval_out = tiny(images)
    lazy = train_out["pred_masks"]
    dense = (
        torch.einsum("bqc,bchw->bqhw", lazy["query_features"][:, :q], lazy["spatial_features"])
        + lazy["bias"].expand(2, g * q)[:, :q, None, None]
    )
    torch.testing.assert_close(dense, eval_out["pred_masks"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(train_out["pred_logits"][:, :q], eval_out["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(train_out["pred_boxes"][:, :q], eval_out["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    m = tiny.spec.size_multiple
    images = _images(1, 4 * m, 4 * m, seed=5)
    grads = []
    for ckpt in (False, True):
        model = build_model("seg-tiny").train()
        model.load_state_dict(tiny.state_dict())
        model.set_grad_checkpointing(ckpt)
        out = model(images)
        (out["pred_logits"].sum() + out["pred_masks"]["spatial_features"].sum()).backward()
        grads.append(model.backbone.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_class_count_and_query_overrides():
    model = build_model("seg-tiny", num_classes=7, num_queries=12).eval()
    assert model.num_slots == 7 and model.num_queries == 12 and model.spec.num_queries == 12
    assert model.query_feat.weight.shape == (12 * model.group_detr, model.spec.hidden_dim)
    with torch.no_grad():
        m = model.spec.size_multiple
        out = model(_images(2, 4 * m, 8 * m))
    assert out["pred_logits"].shape == (2, 12, 7)
    assert out["pred_masks"].shape == (2, 12, m, 2 * m)


def test_from_scratch_init_follows_upstream(tiny):
    prior = -torch.log(torch.tensor(99.0))
    torch.testing.assert_close(tiny.class_embed.bias, prior.expand_as(tiny.class_embed.bias))
    assert torch.count_nonzero(tiny.refpoint_embed.weight) == 0
    assert torch.count_nonzero(tiny.bbox_embed.layers[-1].weight) == 0
    for head in tiny.query_selection.class_embed:
        torch.testing.assert_close(head.weight, tiny.class_embed.weight)
    attn = tiny.decoder.layers[0].cross_attn
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    # The first sampling point of head 0 points right (theta = 0), the second twice as far.
    offsets = attn.sampling_offsets.bias.view(attn.heads, attn.levels, attn.points, 2)
    torch.testing.assert_close(offsets[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["seg-tiny", "seg-nano"])
def test_cuda_matches_cpu(name):
    torch.manual_seed(0)
    cpu = build_model(name).eval()
    gpu = build_model(name).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    m = cpu.spec.size_multiple
    images = _images(2, 8 * m, 10 * m, seed=6)
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            a, b = cpu(images), gpu(images.cuda())
        for key in a:
            torch.testing.assert_close(b[key].cpu(), a[key], atol=1e-3, rtol=1e-3)
        gpu.train()
        out = gpu(images.cuda())
        (out["pred_logits"].sum() + out["pred_masks"]["spatial_features"].mean()).backward()
        assert gpu.query_feat.weight.grad is not None and torch.isfinite(gpu.query_feat.weight.grad).all()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def test_drop_path_only_acts_in_training(tiny):
    model = build_model("seg-tiny")
    model.load_state_dict(tiny.state_dict())
    model.set_drop_path(0.5)
    assert model.backbone.blocks[0].drop_path == 0.0 and model.backbone.blocks[-1].drop_path == 0.5
    m = model.spec.size_multiple
    images = _images(2, 4 * m, 4 * m, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images)["pred_logits"], tiny(images)["pred_logits"])
        model.train()
        torch.manual_seed(0)
        a = model.backbone(images)[-1]
        torch.manual_seed(1)
        b = model.backbone(images)[-1]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="drop_path"):
        model.set_drop_path(1.0)


def test_fixed_selection_reuses_a_given_choice(tiny):
    images = _images(2, 160, 160, seed=3)
    captured = {}
    handle = tiny.query_selection.register_forward_pre_hook(
        lambda _m, args: captured.update(m=args[0], s=args[1])
    )
    with torch.no_grad():
        try:
            out = tiny(images)
        finally:
            handle.remove()
        own = tiny.query_selection.scores(captured["m"], captured["s"]).topk(tiny.num_queries, dim=1).indices
        with tiny.query_selection.fixed_selection(own):
            same = tiny(images)
        with tiny.query_selection.fixed_selection(own.flip(1)):  # the same cells, paired with other queries
            flipped = tiny(images)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(same[key], out[key], rtol=0, atol=0)
    assert not torch.allclose(flipped["pred_boxes"], out["pred_boxes"])
    assert tiny.query_selection._fixed is None  # released after the block
    with pytest.raises(ValueError, match="int64"), tiny.query_selection.fixed_selection(own.float()):
        pass
