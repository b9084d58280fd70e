"""rfdetr_core.mask_rle equals pycocotools (used here only as the reference; core does not depend on it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rfdetr_core.mask_rle import _masks_to_counts, compress_counts, decode_counts, encode_masks, rle_area

mask_utils = pytest.importorskip("pycocotools.mask")


def _reference(masks: np.ndarray) -> list[dict]:
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _cases():
    rng = np.random.default_rng(0)
    for n, h, w in [(3, 1, 1), (4, 1, 37), (4, 29, 1), (6, 7, 5), (5, 31, 17), (3, 64, 48)]:
        for p in (0.05, 0.5, 0.95):
            yield f"random{n}x{h}x{w}p{p}", rng.random((n, h, w)) < p
    yield "empty", np.zeros((2, 13, 11), dtype=bool)
    yield "full", np.ones((2, 13, 11), dtype=bool)
    blobs = np.zeros((3, 301, 257), dtype=bool)
    blobs[0, 100:200, 30:250] = True  # long runs: multi-group numbers, negative differences
    blobs[1, :, :3] = True  # starts with a one-run crossing columns
    blobs[2, -1, -1] = True  # last pixel only
    yield "blobs", blobs


@pytest.mark.parametrize(("name", "masks"), list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_encode_masks_equals_pycocotools(name, masks):
    ours = encode_masks(masks)
    ref = _reference(masks)
    assert [r["counts"] for r in ours] == [r["counts"] for r in ref]
    assert [list(r["size"]) for r in ours] == [list(r["size"]) for r in ref]
    np.testing.assert_array_equal(rle_area(ours), mask_utils.area(ref).astype(np.float64))
    # torch input (bool and uint8) gives the same strings
    assert encode_masks(torch.from_numpy(masks)) == ours
    assert encode_masks(masks.astype(np.uint8)) == ours
    # the tensor path (taken for CUDA tensors) gives the same runs as the numpy path
    runs_np = _masks_to_counts(np.ascontiguousarray(masks))
    runs_torch = _masks_to_counts(torch.from_numpy(np.ascontiguousarray(masks)))
    for a, b in zip(runs_np, runs_torch, strict=True):
        np.testing.assert_array_equal(a, b)
    for r in ours:
        runs = decode_counts(r["counts"])
        assert runs.sum() == masks.shape[1] * masks.shape[2]


def test_encode_masks_1080p():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 1080, 1920), dtype=bool)
    for i in range(4):
        y, x = rng.integers(0, 900), rng.integers(0, 1700)
        masks[i, y : y + rng.integers(1, 180), x : x + rng.integers(1, 220)] = True
    masks[3] |= rng.random((1080, 1920)) < 0.01
    assert [r["counts"] for r in encode_masks(masks)] == [r["counts"] for r in _reference(masks)]


def test_compress_counts_and_area_of_uncompressed():
    counts = [[0, 5, 3, 2], [10], [4, 1, 2, 3]]
    ours = compress_counts(counts, 2, 5)
    ref = mask_utils.frPyObjects([{"counts": c, "size": [2, 5]} for c in counts], 2, 5)
    assert [r["counts"] for r in ours] == [r["counts"] for r in ref]
    np.testing.assert_array_equal(rle_area([{"counts": c, "size": [2, 5]} for c in counts]), [7, 0, 4])
    # str counts (JSON) and bytes counts give the same area
    assert rle_area([{**r, "counts": r["counts"].decode()} for r in ours]).tolist() == [7, 0, 4]
    assert rle_area([]).shape == (0,)


def test_encode_masks_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        encode_masks(np.zeros((4, 4), dtype=bool))
    assert encode_masks(np.zeros((0, 4, 4), dtype=bool)) == []
