"""The post-export check's pairing of detections (rfdetr_export.check): strict where scores are distinct,
tie-aware where float32 sigmoids tie (swaps among equal scores, ties straddling the K-th place)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rfdetr_export.check import TOLERANCES, compare_outputs

SIZES = [(100, 200)]
F32 = TOLERANCES["float32"]


def _side(scores, labels, boxes, k_masks=None):
    """A deploy tuple of one image; ``boxes`` as ``[K, 4]`` normalised xyxy; masks: one blob per box."""
    scores = torch.tensor([scores], dtype=torch.float32)
    labels = torch.tensor([labels], dtype=torch.int64)
    boxes = torch.tensor([boxes], dtype=torch.float32)
    masks = torch.full((1, len(labels[0]), 8, 8), -5.0)
    for k, (x0, y0, x1, y1) in enumerate(boxes[0].tolist()):
        masks[
            0,
            k,
            int(y0 * 8) : max(int(y0 * 8) + 1, int(y1 * 8)),
            int(x0 * 8) : max(int(x0 * 8) + 1, int(x1 * 8)),
        ] = 5.0
    return scores, labels, boxes, masks


A, B, C, D = [0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]


def test_identical_outputs_pair_by_rank():
    side = _side([0.9, 0.8, 0.7], [1, 2, 3], [A, B, C])
    r = compare_outputs(side, side, SIZES, F32)
    assert r.ok and (r.unmatched, r.cutoff_ties, r.score_error, r.box_error_px) == (0, 0, 0.0, 0.0)


def test_swap_among_tied_scores_is_paired_by_label_and_box():
    one = _side([1.0, 1.0, 0.5], [1, 2, 3], [A, B, C])
    other = _side([1.0, 1.0, 0.5], [2, 1, 3], [B, A, C])
    r = compare_outputs(one, other, SIZES, F32)
    assert r.ok and r.unmatched == 0 and r.box_error_px == 0.0 and r.min_mask_iou == 1.0


def test_tie_straddling_the_kth_place_counts_as_cutoff_tie():
    # the third place: both sides had two pairs at 0.99999964 and each kept a different one
    tied = float(np.float32(0.99999964))
    one = _side([1.0, 1.0, tied], [1, 2, 3], [A, B, C])
    other = _side([1.0, 1.0, tied], [1, 2, 4], [A, B, D])
    r = compare_outputs(one, other, SIZES, F32)
    assert r.ok and r.cutoff_ties == 2 and r.unmatched == 0, r.line()
    assert "ties at the cut-off 2" in r.line()


def test_a_different_pair_above_the_cutoff_is_unmatched():
    one = _side([0.9, 0.8, 0.1], [1, 2, 3], [A, B, C])
    other = _side([0.9, 0.7, 0.1], [1, 4, 3], [A, D, C])  # rank 2: another object, not a tie
    r = compare_outputs(one, other, SIZES, F32)
    assert not r.ok and r.unmatched == 2 and r.cutoff_ties == 0


def test_same_label_and_score_but_another_box_is_not_a_swap():
    # the symptom of a real indexing bug (a detection taking another query's box) still fails
    one = _side([0.9, 0.8, 0.7], [1, 1, 3], [A, B, C])
    other = _side([0.9, 0.8, 0.7], [1, 1, 3], [A, D, C])
    r = compare_outputs(one, other, SIZES, F32)
    assert not r.ok and r.unmatched == 2


def test_scores_and_boxes_of_pairs_are_held_to_the_tolerances():
    one = _side([0.9, 0.8], [1, 2], [A, B])
    worse = _side([0.9, 0.8 - 2e-3], [1, 2], [A, B])
    assert not compare_outputs(one, worse, SIZES, F32).ok
    shifted = _side([0.9, 0.8], [1, 2], [A, [0.5, 0.5, 1.0, 0.99]])  # 1 px at 100 px high
    r = compare_outputs(one, shifted, SIZES, F32)
    assert not r.ok and r.box_error_px == pytest.approx(1.0, abs=1e-4)


def test_onnxruntime_and_torch_sigmoids_tie_differently_where_they_saturate():
    """The cause of the ties: float32 sigmoid is exactly 1.0 above logit ~16.6 and moves by single ulps
    below, and ONNX Runtime's Sigmoid differs from torch.sigmoid in that last bit (seg-nano, random heads at
    192 px: 42 of 9100 pairs at exactly 1.0 in torch, 36 in ONNX Runtime, the 100th score 0.99999964 with 38
    pairs within 1.2e-7 of it, while their logits are 0.02 apart and agree across runtimes to 5e-5)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])],
        "sigmoid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = torch.linspace(10.0, 24.0, 2001)
    ours = torch.sigmoid(logits).numpy()
    theirs = session.run(None, {"x": logits.numpy()})[0]
    assert (ours == 1.0).sum() > 100 and (theirs == 1.0).sum() > 100  # saturated: ties
    # they agree to an ulp or two (onnxruntime 1.32: not bit for bit, about a third of these differ), so
    # which of the tied pairs comes first is up to the runtime
    assert np.abs(ours - theirs).max() <= 1.2e-7


def test_boxes_of_zero_size_pair_by_their_corners():
    # barely trained models predict boxes of zero width: no IoU, yet the same box on both sides
    flat = [0.5, 0.5, 0.5, 0.75]
    one = _side([0.9, 0.8], [1, 2], [flat, B])
    r = compare_outputs(one, one, SIZES, F32)
    assert r.ok and r.unmatched == 0
    moved = _side([0.9, 0.8], [1, 2], [[0.6, 0.5, 0.6, 0.75], B])  # 20 px away: another box
    assert compare_outputs(one, moved, SIZES, F32).unmatched == 2


def test_a_mask_only_failure_gets_the_hint_and_others_do_not():
    from rfdetr_export.check import CheckResult, failure_hint

    def result(**changes):
        fields = dict(batch=3, detections=30, score_error=1e-5, box_error_px=0.0, min_mask_iou=0.995, unmatched=0)
        fields.update(changes)
        return CheckResult(tolerance=F32, **fields)

    passed, masks_off = result(), result(min_mask_iou=0.97)
    assert failure_hint([passed]) is None  # nothing failed
    assert masks_off.only_masks_off and not passed.only_masks_off
    hint = failure_hint([passed, masks_off])
    assert hint is not None and "mask IoU" in hint and "--check-images" in hint
    # another failure alongside (scores, boxes or an unpaired detection): no hint, the numbers speak
    for other in (result(min_mask_iou=0.97, score_error=0.1), result(box_error_px=3.0), result(unmatched=2)):
        assert not other.only_masks_off
        assert failure_hint([masks_off, other]) is None


INT8 = TOLERANCES["int8"]  # min_score: only the confident detections take part


def test_min_score_compares_only_the_confident_detections():
    # below the cut the two sides disagree completely (another label, box and order): ignored
    one = _side([0.9, 0.6, 0.2, 0.1], [1, 2, 3, 1], [A, B, C, D])
    other = _side([0.89, 0.62, 0.25, 0.05], [1, 2, 4, 2], [A, B, D, C])
    r = compare_outputs(one, other, SIZES, INT8)
    assert r.ok and r.compared == 2 and r.unmatched == 0, r.line()
    assert "2 detections above score 0.3" in r.line()
    assert r.score_error == pytest.approx(0.02, abs=1e-6)


def test_min_score_pairs_a_detection_crossing_the_cut_and_fails_a_missing_one():
    cut = INT8.min_score
    one = _side([0.9, cut + 0.01], [1, 2], [A, B])
    crossing = _side([0.9, cut - 0.01], [1, 2], [A, B])  # the same detection, just under the cut
    r = compare_outputs(one, crossing, SIZES, INT8)
    assert r.ok and r.unmatched == 0 and r.score_error == pytest.approx(0.02, abs=1e-6), r.line()
    missing = _side([0.9, 0.05], [1, 2], [A, B])  # a confident detection far below on the other side
    r = compare_outputs(one, missing, SIZES, INT8)
    assert not r.ok and r.unmatched == 1, r.line()
    # left over but not confident (under the cut on both sides' terms): a tie, not a failure
    weak = _side([0.9, cut - 0.02], [1, 2], [A, B])
    r = compare_outputs(weak, missing, SIZES, INT8)
    assert r.ok and r.cutoff_ties == 1 and r.unmatched == 0, r.line()


def test_min_score_with_nothing_confident_says_nothing_was_compared():
    weak = _side([0.2, 0.1], [1, 2], [A, B])
    r = compare_outputs(weak, weak, SIZES, INT8)
    assert r.nothing_compared and r.compared == 0
    assert "nothing was compared" in r.line() and "--check-images" in r.line()


def test_a_failed_int8_check_gets_the_int8_hint():
    from rfdetr_export.check import failure_hint

    one = _side([0.9, 0.6], [1, 2], [A, B])
    other = _side([0.9, 0.1], [1, 2], [A, B])  # a confident detection lost
    r = compare_outputs(one, other, SIZES, INT8)
    assert not r.ok
    hint = failure_hint([r])
    assert hint is not None and "int8" in hint and "rfdetr-train val" in hint and "--check-images" in hint
    assert failure_hint([compare_outputs(one, one, SIZES, INT8)]) is None  # nothing failed
