"""Post-processing: top-k selection, boxes, masks; parity with upstream's PostProcess."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rfdetr_core.postprocess import boxes_to_pixels, postprocess, select_topk, upsample_masks


def _outputs(batch=2, queries=30, slots=91, mask_hw=(20, 24), seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, slots, generator=g) * 3
    if ties:
        # exact ties across queries and slots: the stable order must keep the lower flat index first
        logits[:, 3, 5] = logits[:, 7, 2] = logits[:, 1, 60] = 6.0
    boxes = torch.rand(batch, queries, 4, generator=g)
    boxes[:, :, 2:] *= 1.5  # some boxes spill over the image border: they must be clamped
    boxes[0, 0, 2] = -0.1  # a negative width counts as 0
    masks = torch.randn(batch, queries, *mask_hw, generator=g) * 4
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}


def _reference_masks(mask_logits, queries, size):
    up = F.interpolate(mask_logits[queries][:, None], size=size, mode="bilinear", align_corners=False)
    return up[:, 0] > 0


def test_topk_order_and_indexing():
    out = _outputs(batch=1, queries=4, slots=3)
    scores, slots, queries = select_topk(out["pred_logits"], num_select=5)
    probs = out["pred_logits"].sigmoid()[0]
    flat_sorted = probs.flatten().sort(descending=True).values[:5]
    assert torch.allclose(scores[0], flat_sorted)
    for s, k, q in zip(scores[0], slots[0], queries[0]):
        assert probs[q, k] == s
    # num_select larger than Q*K is capped
    assert select_topk(out["pred_logits"], 100)[0].shape == (1, 12)


def test_ties_keep_lower_flat_index_first():
    logits = torch.zeros(1, 3, 2)
    scores, slots, queries = select_topk(logits, 6)
    assert queries[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert slots[0].tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("num_select", [1, 7, 40, 119, 120])
def test_selection_equals_stable_descending_argsort(num_select):
    # few distinct values: ties everywhere, also across the num_select-th place
    logits = torch.randint(-2, 3, (3, 8, 15), generator=torch.Generator().manual_seed(1)).float()
    scores, slots, queries = select_topk(logits, num_select)
    probs = logits.sigmoid().flatten(1)
    order = probs.argsort(dim=1, descending=True, stable=True)[:, :num_select]
    assert torch.equal(queries * 15 + slots, order)
    assert torch.equal(scores, probs.gather(1, order))


@pytest.mark.parametrize("n", [1, 7, 40, 120])
def test_cuda_sort_path_equals_the_partition_path(n):
    # select_topk sorts on CUDA and partitions elsewhere (and when exporting): the same indexes
    from rfdetr_core.postprocess import _stable_descending_order, _top_pairs_in_order

    probs = torch.randint(-2, 3, (3, 120), generator=torch.Generator().manual_seed(2)).float().sigmoid()
    assert torch.equal(_stable_descending_order(probs)[:, :n], _top_pairs_in_order(probs, n))


def test_boxes_in_source_pixels_and_clamped():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.95, 0.1, 0.3, 0.4]]])
    queries = torch.tensor([[1, 0]])
    xyxy = boxes_to_pixels(boxes, queries, torch.tensor([[100.0, 200.0]]))  # h=100, w=200
    assert torch.allclose(xyxy[0, 0], torch.tensor([160.0, 0.0, 200.0, 30.0]))
    assert torch.allclose(xyxy[0, 1], torch.tensor([80.0, 30.0, 120.0, 70.0]))


@pytest.mark.parametrize("chunk", [1, 700, None])
def test_upsample_masks_chunks_agree(chunk):
    logits = torch.randn(7, 9, 11)
    got = upsample_masks(logits, (37, 53), chunk_elements=chunk)
    assert got.dtype == torch.bool and got.shape == (7, 37, 53)
    assert torch.equal(got, _reference_masks(logits, torch.arange(7), (37, 53)))


def test_threshold_is_strict_and_applied_before_masks():
    out = _outputs(batch=1)
    res_all = postprocess(out, [(40, 50)], num_select=30)[0]
    cut = float(res_all["scores"][9])
    res = postprocess(out, [(40, 50)], num_select=30, threshold=cut)[0]
    assert len(res["scores"]) == 9  # score > threshold, so the 10th (== cut) is dropped
    assert res["masks"].shape == (9, 40, 50)
    assert torch.equal(res["masks"], res_all["masks"][:9])


def test_valid_slots_drop_unmapped_classes():
    out = _outputs(batch=1, slots=5)
    valid = torch.tensor([False, True, True, False, True])
    res = postprocess(out, [(16, 16)], num_select=40, valid_slots=valid)[0]
    assert len(res["labels"]) > 0
    assert valid[res["labels"]].all()
    full = postprocess(out, [(16, 16)], num_select=40)[0]
    keep = valid[full["labels"]]
    assert torch.equal(res["scores"], full["scores"][keep])
    assert torch.equal(res["masks"], full["masks"][keep])


def test_masks_follow_queries_including_repeated_ones():
    out = _outputs(batch=2, queries=6, slots=8, mask_hw=(7, 9))
    sizes = [(33, 21), (14, 60)]
    res = postprocess(out, sizes, num_select=20)
    for i, r in enumerate(res):
        assert len(set(r["queries"].tolist())) < len(r["queries"])  # a query picked with several classes
        assert torch.equal(r["masks"], _reference_masks(out["pred_masks"][i], r["queries"], sizes[i]))


def test_empty_selection_and_no_masks():
    out = _outputs(batch=1)
    res = postprocess(out, [(10, 12)], num_select=30, threshold=1.0)[0]
    assert res["masks"].shape == (0, 10, 12) and res["boxes"].shape == (0, 4)
    out.pop("pred_masks")
    assert "masks" not in postprocess(out, [(10, 12)], num_select=5)[0]


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="source_sizes"):
        postprocess(_outputs(batch=2), [(10, 10)], num_select=5)


@pytest.mark.parity
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_matches_upstream_postprocess(threshold):
    upstream = pytest.importorskip("rfdetr.models.postprocess")
    out = _outputs(batch=3, queries=30, slots=91, mask_hw=(20, 24), seed=3, ties=True)
    sizes = [(97, 131), (50, 40), (480, 640)]
    ref = upstream.PostProcess(num_select=30)(out, torch.tensor(sizes), score_threshold=threshold)
    ours = postprocess(out, sizes, num_select=30, threshold=threshold)
    for r, o in zip(ref, ours, strict=True):
        assert torch.equal(o["labels"], r["labels"])
        assert torch.equal(o["scores"], r["scores"])
        assert torch.allclose(o["boxes"], r["boxes"], atol=1e-4, rtol=0)
        assert torch.equal(o["masks"], r["masks"][:, 0])
