"""Our model with converted weights reproduces upstream rfdetr 1.11.2's raw eval outputs.

Upstream models are built offline with random weights (then perturbed so that zero-initialised paths such as the
box deltas, reference offsets and deformable attention weights carry signal), saved with ``torch.save``, converted
with ``convert_upstream_state_dict`` and loaded strictly.

Eval outputs are checked in two steps, for several initialisations per variant (issue 12, item 1):

1. The two-stage choice: our top-k cells, in order, equal upstream's, except where the cells that the two sides
   order differently have upstream scores within float32 rounding of each other. The order is discontinuous at
   such near-ties (the j-th selected cell is paired with the j-th learned query), and two correct float32
   implementations disagree there: scores differ by ~1e-6 (upstream's own float32 scores are as far from its
   float64 ones), while near-ties that close occur in about one initialisation in three.
2. Given upstream's choice (``QuerySelection.fixed_selection``), every output slot equals upstream's slot.

A float64 comparison without pinning checks that each slot gets its own query rows where no flip happens.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import rfdetr_core  # noqa: F401  (registers torch.ops.rfdetr)
from rfdetr_core.errors import CheckpointError
from rfdetr_core.factory import build_model
from rfdetr_core.variants import get_variant
from rfdetr_core.weights.upstream import convert_upstream_state_dict

pytestmark = [
    pytest.mark.parity,
    # Upstream warns that random init is less accurate than its checkpoints: intended here.
    pytest.mark.filterwarnings("ignore:.*instantiated with pretrain_weights=None"),
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# variant -> (upstream config class, default size, one larger valid size, one non-square valid size).
# Every registered variant that upstream 1.11.2 builds (not xlarge/2xlarge: no upstream config; not seg-tiny: ours).
# Grids wider than 50 cells (seg-xlarge larger, seg-2xlarge) exercise upstream's border rule for proposals.
CASES = {
    "seg-nano": ("RFDETRSegNanoConfig", (312, 312), (396, 396), (240, 396)),
    "seg-small": ("RFDETRSegSmallConfig", (384, 384), (432, 432), (288, 432)),
    "seg-medium": ("RFDETRSegMediumConfig", (432, 432), (480, 480), (336, 528)),
    "seg-large": ("RFDETRSegLargeConfig", (504, 504), (528, 528), (384, 528)),
    "seg-xlarge": ("RFDETRSegXLargeConfig", (624, 624), (648, 648), (432, 648)),
    "seg-2xlarge": ("RFDETRSeg2XLargeConfig", (768, 768), (792, 792), (288, 816)),
    "nano": ("RFDETRNanoConfig", (384, 384), (448, 448), (320, 448)),
    "small": ("RFDETRSmallConfig", (512, 512), (544, 544), (384, 576)),
    "medium": ("RFDETRMediumConfig", (576, 576), (608, 608), (448, 640)),
    "large": ("RFDETRLargeConfig", (704, 704), (736, 736), (512, 640)),
    "base": ("RFDETRBaseConfig", (560, 560), (616, 616), (448, 672)),
    "large-legacy": ("RFDETRLargeDeprecatedConfig", (560, 560), (616, 616), (448, 672)),
}
SIZES = ("default", "larger", "non-square")
# Cheap variants get more initialisations and run unmarked; the rest are marked slow.
CHEAP = ("seg-nano", "nano")
TOL = 1e-4
# Two cells may be ordered differently only if their upstream scores are this close (relative to the score size):
# float32 rounding of the scores, ~1e-6 between two implementations, with a margin.
TIE_TOL = 2e-5
LEGACY_SEED = 0  # the initialisation of the pair that the conversion and training tests below reuse


def _eval_cases():
    """``(variant, size, seed)``: two initialisations per variant (one at the default size, the other at the
    larger and the non-square size), three more for the cheap ones."""
    cases = []
    for variant in CASES:
        cheap = variant in CHEAP
        for seed in (0, 1, 2) if cheap else (0,):
            cases.append((variant, "default", seed, not cheap))
        for which in SIZES[1:]:
            cases.append((variant, which, 3 if cheap else 1, True))
    return [
        pytest.param(v, w, s, marks=[pytest.mark.slow] if slow else [], id=f"{v}-{w}-seed{s}")
        for v, w, s, slow in cases
    ]


def _build_upstream(config_name: str, same_slots: bool = True, seed: int = LEGACY_SEED):
    rfdetr_config = pytest.importorskip("rfdetr.config")
    rfdetr_models = pytest.importorskip("rfdetr.models")
    # Legacy Base would download DINOv2 when pretrain_weights is None; a missing local file skips that.
    weights = (
        "/nonexistent/rfdetr-parity.pth"
        if config_name in ("RFDETRBaseConfig", "RFDETRLargeDeprecatedConfig")
        else None
    )
    cfg = getattr(rfdetr_config, config_name)(pretrain_weights=weights, device="cpu")
    torch.manual_seed(
        seed
    )  # same weights whatever ran before (upstream initialises from the global generator)
    model = rfdetr_models.build_model_from_config(cfg).eval()
    gen = torch.Generator().manual_seed(1234 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        if same_slots:
            for emb in (model.query_feat, model.refpoint_embed):
                emb.weight.copy_(emb.weight[:1].clone().expand_as(emb.weight))
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(variant, seed, same_slots) -> (upstream model, our converted model, path of the saved upstream state
    dict); built lazily, one pair alive at a time (the big ones take ~0.5 GB each)."""
    cache: dict[tuple, tuple] = {}

    def get(variant: str, seed: int = LEGACY_SEED, same_slots: bool = True):
        key = (variant, seed, same_slots)
        if key not in cache:
            cache.clear()
            upstream = _build_upstream(CASES[variant][0], same_slots, seed)
            path = tmp_path_factory.mktemp("upstream") / f"{variant}-{seed}.pth"
            torch.save(upstream.state_dict(), path)
            ours = build_model(variant).eval()
            sd, notes = convert_upstream_state_dict(torch.load(path, weights_only=True), ours.spec)
            assert notes == []
            ours.load_state_dict(sd, strict=True)
            cache[key] = (upstream, ours, path)
        return cache[key]

    return get


def _boundary_gap(scores: torch.Tensor, k: int) -> float:
    """Smallest score gap at the top-k boundary of each row; exact ties (identical masked cells) are harmless."""
    gaps = []
    for row in scores:
        s = row.sort(descending=True).values
        if k >= s.numel():
            continue
        a = s[k - 1]
        if s[k] != a:
            gaps.append(float(a - s[k]))
            continue
        above, below = s[:k][s[:k] != a], s[k:][s[k:] != a]
        if above.numel():
            gaps.append(float(above.min() - a))
        if below.numel():
            gaps.append(float(a - below.max()))
    return min(gaps, default=float("inf"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _upstream_with_scores(upstream, images):
    """Upstream's eval outputs and the two-stage score of every cell, ``[B, S]`` (its first class-head call)."""
    scores = {}

    def grab(_module, _args, out):  # out: [B, S, K]
        scores.setdefault("cells", out.max(-1).values)

    handle = upstream.transformer.enc_out_class_embed[0].register_forward_hook(grab)
    try:
        out = upstream(images)
    finally:
        handle.remove()
    return out, scores["cells"]


def _assert_same_choice(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor) -> None:
    """``ours``/``theirs`` ``[B, k]`` selected cells agree except among cells tied in ``scores [B, S]`` within
    float32 rounding."""
    for b in range(theirs.shape[0]):
        differ = (ours[b] != theirs[b]).nonzero().flatten()
        if differ.numel() == 0:
            continue
        # slot by slot: the two cells a slot holds on the two sides must be tied within rounding
        a, t = scores[b][ours[b][differ]], scores[b][theirs[b][differ]]
        gap = float((a - t).abs().max())
        assert gap <= TIE_TOL * max(1.0, float(t.abs().max())), (
            f"image {b}: {differ.numel()} selected slots differ from upstream's, one by a score gap of "
            f"{gap:.2e} (more than float32 rounding)"
        )


@pytest.mark.parametrize(("variant", "which", "seed"), _eval_cases())
def test_eval_outputs_match_upstream(pairs, variant, which, seed):
    upstream, ours, _ = pairs(variant, seed, same_slots=False)
    h, w = CASES[variant][1 + SIZES.index(which)]
    images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        ref, up_scores = _upstream_with_scores(upstream, images)
        k = min(ours.num_queries, up_scores.shape[1])
        up_cells = up_scores.topk(k, dim=1).indices
        captured = {}
        handle = ours.query_selection.register_forward_pre_hook(
            lambda _module, args: captured.update(memory=args[0], shapes=args[1])
        )
        try:
            with ours.query_selection.fixed_selection(up_cells):
                out = ours(images)
        finally:
            handle.remove()
        our_scores = ours.query_selection.scores(captured["memory"], captured["shapes"])
        our_cells = our_scores.topk(k, dim=1).indices
    _assert_same_choice(our_cells, up_cells, up_scores)
    keys = ("pred_logits", "pred_boxes") + (("pred_masks",) if ours.is_segmentation else ())
    assert set(out) == set(keys)
    errors = {}
    for key in keys:
        assert out[key].shape == ref[key].shape, key
        errors[key] = _rel(out[key], ref[key])
    assert all(e < TOL for e in errors.values()), errors


def _assign(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Index into ``theirs`` [N, K] matching each row of ``ours`` [N, K] one-to-one (nearest logits)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(torch.cdist(ours.double(), theirs.double()).numpy())
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


def test_training_outputs_match_upstream(pairs):
    """Training mode: all 13 groups, every decoder layer, the two-stage output and the lazy mask entries."""
    upstream, ours, _ = pairs("seg-nano")
    q, g = ours.num_queries, ours.group_detr
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _ in range(8):
            images = torch.randn(1, 3, 240, 240, generator=gen)
            _, memory, shapes = ours.features(images)
            gap = min(_boundary_gap(ours.query_selection.scores(memory, shapes, grp), q) for grp in range(g))
            if gap >= 1e-4:
                break
        else:
            pytest.fail(f"eight inputs in a row had a two-stage top-k gap under 1e-4 (last {gap:.2e})")
    upstream.train(), ours.train()
    try:
        with torch.no_grad():
            out, ref = ours(images), upstream(images)
    finally:
        upstream.eval(), ours.eval()
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == ours.spec.dec_layers - 1
    pairs_out = [*zip(out["aux_outputs"], ref["aux_outputs"], strict=True), (out, ref)]
    pairs_out.append((out["enc_outputs"], ref["enc_outputs"]))
    for a, b in pairs_out:
        assert a["pred_logits"].shape == b["pred_logits"].shape == (1, g * q, ours.num_slots)
        # Ours folds the 1x1 spatial projection into the queries (MaskHead.folded_queries), upstream keeps the
        # projected map and one scalar bias: compare the pixel side through each query's logits below.
        mask_logits = {
            side: torch.einsum("bqc,bchw->bqhw", m["query_features"], m["spatial_features"])
            + m["bias"].expand(m["query_features"].shape[:2])[..., None, None]
            for side, m in (("ours", a["pred_masks"]), ("upstream", b["pred_masks"]))
        }
        for grp in range(g):
            rows = slice(grp * q, (grp + 1) * q)
            match = _assign(a["pred_logits"][0, rows], b["pred_logits"][0, rows])
            for key, got, want in (
                ("logits", a["pred_logits"][0, rows], b["pred_logits"][0, rows][match]),
                ("boxes", a["pred_boxes"][0, rows], b["pred_boxes"][0, rows][match]),
                ("mask logits", mask_logits["ours"][0, rows], mask_logits["upstream"][0, rows][match]),
            ):
                assert _rel(got, want) < TOL, (grp, key, _rel(got, want))


def test_distinct_slots_match_upstream_in_float64(pairs):
    """Without float32 near-ties, slot ``k`` must pair the k-th selected cell with the k-th query rows."""
    upstream = copy.deepcopy(pairs("seg-nano")[0]).double()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for emb in (upstream.query_feat, upstream.refpoint_embed):
            emb.weight.normal_(0.0, 0.5, generator=gen)
    ours = build_model("seg-nano").eval()
    ours.load_state_dict(convert_upstream_state_dict(upstream.state_dict(), ours.spec)[0], strict=True)
    ours.double()
    images = torch.randn(1, 3, 240, 240, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out, ref = ours(images), upstream(images)
    for k in ("pred_logits", "pred_boxes", "pred_masks"):
        assert _rel(out[k], ref[k]) < 1e-7, k


def test_create_model_loads_upstream_file(pairs):
    factory = pytest.importorskip("rfdetr_core.factory", reason="create_model is not written yet")
    upstream, ours, path = pairs("seg-nano")
    model = factory.create_model("seg-nano", weights=path).eval()
    images = torch.randn(1, 3, 312, 312, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(images), ours(images)
    for k in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(a[k], b[k])


# Adapting upstream files to other model shapes (uses the cached Seg-Nano pair, so no extra upstream build).


def _upstream_sd(pairs):
    upstream, _, path = pairs("seg-nano")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("slots", [5, 200])
def test_class_head_is_tiled_or_truncated(pairs, slots):
    sd_up = _upstream_sd(pairs)
    model = build_model("seg-nano", num_classes=slots).eval()
    sd, notes = convert_upstream_state_dict(sd_up, model.spec)
    model.load_state_dict(sd, strict=True)
    assert any(("truncated" if slots < 91 else "tiled") in n for n in notes)
    rows = torch.arange(slots) % 91
    torch.testing.assert_close(model.class_embed.weight, sd_up["class_embed.weight"][rows])
    for g in (0, 12):
        torch.testing.assert_close(
            model.query_selection.class_embed[g].bias,
            sd_up[f"transformer.enc_out_class_embed.{g}.bias"][rows],
        )
    with torch.no_grad():
        assert model(torch.randn(1, 3, 120, 96))["pred_logits"].shape == (1, 100, slots)


def test_fewer_queries_and_groups_are_sliced_per_group(pairs):
    sd_up = _upstream_sd(pairs)
    model = build_model(get_variant("seg-nano").with_overrides(group_detr=3), num_queries=30)
    sd, notes = convert_upstream_state_dict(sd_up, model.spec)
    model.load_state_dict(sd, strict=True)
    assert any("per group" in n for n in notes)
    full = sd_up["query_feat.weight"].view(13, 100, -1)
    torch.testing.assert_close(model.query_feat.weight.view(3, 30, -1), full[:3, :30])
    ref = sd_up["refpoint_embed.weight"].view(13, 100, 4)
    torch.testing.assert_close(model.refpoint_embed.weight.view(3, 30, 4), ref[:3, :30])
    assert len(model.query_selection.proj) == 3


def test_more_queries_than_the_file_has_is_an_error(pairs):
    with pytest.raises(CheckpointError, match="num_queries <= 100"):
        convert_upstream_state_dict(_upstream_sd(pairs), build_model("seg-nano", num_queries=150).spec)


def test_position_table_is_resized_to_the_model_grid(pairs):
    sd_up = _upstream_sd(pairs)
    model = build_model(get_variant("seg-nano").with_overrides(positional_encoding_size=20)).eval()
    sd, notes = convert_upstream_state_dict(sd_up, model.spec)
    model.load_state_dict(sd, strict=True)
    assert model.backbone.pos_embed.shape == (1, 401, 384)
    assert any("26x26 to 20x20" in n for n in notes)
    # Resizing at load time or at run time is the same bicubic map: the resized table, used at its own grid,
    # equals the original table resized on the fly to that grid.
    original = sd_up["backbone.0.encoder.encoder.embeddings.position_embeddings"]
    from rfdetr_core.models.backbone import resize_patch_pos_embed

    torch.testing.assert_close(model.backbone.pos_embed, resize_patch_pos_embed(original, (20, 20)))


@pytest.mark.parametrize(
    ("target", "why"),
    [("nano", "detection"), ("seg-medium", "5 decoder layers"), ("large-legacy", "encoder width 768")],
)
def test_checkpoints_that_do_not_fit_name_the_right_variant(pairs, target, why):
    with pytest.raises(CheckpointError, match=rf"(?s){why}.*'seg-nano' checkpoint"):
        convert_upstream_state_dict(_upstream_sd(pairs), build_model(target).spec)


def test_meaningless_keys_are_dropped_and_unknown_ones_reported(pairs):
    sd_up = dict(_upstream_sd(pairs))
    assert "_kp_active_mask" in sd_up and any(k.endswith("mask_token") for k in sd_up)
    sd_up["transformer.decoder.keypoint_pos_embed"] = torch.zeros(3, 256)
    model = build_model("seg-nano")
    sd, notes = convert_upstream_state_dict({f"model.{k}": v for k, v in sd_up.items()}, model.spec)
    model.load_state_dict(sd, strict=True)
    assert len(notes) == 1 and "keypoint_pos_embed" in notes[0] and "mask_token" not in notes[0]
