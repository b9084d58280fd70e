"""The device RLE encoder (``rfdetr_core.mask_rle_cuda``, run here with its torch ops on the CPU) equals
pycocotools; RLE-backed Detections decode on access."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rfdetr_core.detections import Detections
from rfdetr_core.mask_rle import decode_masks
from rfdetr_core.mask_rle_cuda import encode_masks_on_device as encode_masks

mask_api = pytest.importorskip("pycocotools.mask")


def _reference(masks: torch.Tensor) -> list[dict]:
    return mask_api.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (33, 17), (64, 96), (5, 200)])
def test_equals_pycocotools_including_empty_full_and_edge_runs(size):
    g = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    h, w = size
    noise = torch.rand(6, h, w, generator=g) > 0.5
    smooth = torch.nn.functional.interpolate(torch.randn(3, 1, 4, 4, generator=g), size=size, mode="bilinear")
    masks = torch.cat(
        [
            noise,
            smooth[:, 0] > 0,
            torch.zeros(1, h, w, dtype=torch.bool),
            torch.ones(1, h, w, dtype=torch.bool),
        ]
    )
    masks[0, 0, 0] = True  # first pixel set: counts start with an empty zeros-run
    masks[1, -1, -1] = True  # last pixel set: no empty run after the last
    ours = encode_masks(masks)
    ref = _reference(masks)
    assert [o["counts"] for o in ours] == [r["counts"] for r in ref]
    assert all(o["size"] == [h, w] for o in ours)
    np.testing.assert_array_equal(decode_masks(ours), masks.numpy())


def test_large_counts_use_several_character_groups():
    # a 300x400 mask with one long run and a negative delta exercises 4+ groups and the sign rule
    masks = torch.zeros(1, 300, 400, dtype=torch.bool)
    masks[0, :, 5:390] = True
    masks[0, 10:12, 200] = False
    ours, ref = encode_masks(masks), _reference(masks)
    assert ours[0]["counts"] == ref[0]["counts"]
    assert (
        mask_api.decode({"size": [300, 400], "counts": ours[0]["counts"]}).astype(bool).tolist()
        == masks[0].tolist()
    )


def _assert_compression_equals_the_numpy_encoder(per_mask: list[list[int]]) -> None:
    """``_compress`` of the concatenated counts (one list per mask) gives the numpy encoder's characters."""
    from rfdetr_core.mask_rle import compress_counts
    from rfdetr_core.mask_rle_cuda import _compress

    lengths = torch.tensor([len(c) for c in per_mask])
    counts = torch.tensor([v for c in per_mask for v in c], dtype=torch.int64)
    ends = torch.cumsum(lengths, 0)
    first = ends - lengths
    owner = torch.repeat_interleave(torch.arange(len(per_mask)), lengths)
    chars, length = _compress(counts, owner, first, ends, len(per_mask))
    data = chars.numpy().tobytes()
    offsets = [0, *np.cumsum(length.numpy()).tolist()]
    want = compress_counts(per_mask, 1, 1)
    assert [data[offsets[i] : offsets[i + 1]] for i in range(len(per_mask))] == [w["counts"] for w in want]


def test_character_compression_of_extreme_counts_equals_the_numpy_encoder():
    """Counts of every magnitude up to COCO's int32 limit, so deltas need all 7 five-bit groups, both signs."""
    rng = np.random.default_rng(0)
    per_mask = []
    for n in (1, 2, 3, 4, 9, 40):
        magnitude = 2 ** rng.integers(0, 31, size=n)
        per_mask.append((rng.integers(0, magnitude) if n > 1 else magnitude - 1).tolist())
    per_mask.append([0, 2**31 - 1, 0, 2**31 - 1, 1, 0])  # the widest deltas of both signs
    _assert_compression_equals_the_numpy_encoder(per_mask)


def test_character_compression_at_every_group_boundary_equals_the_numpy_encoder():
    """Deltas of +-(2**b - 1), +-2**b and +-(2**b + 1) for every bit length b: where a count needs one 5-bit
    group more (the group count comes from the value's bit length)."""
    per_mask = []
    for b in range(0, 31):
        for d in (2**b - 1, 2**b, 2**b + 1):
            for sign in (1, -1):
                base = 2**31 - 1 if sign < 0 else 0  # the 4th count is the 2nd plus the delta, within int32
                count = base + sign * d
                if 0 <= count <= 2**31 - 1:
                    per_mask.append([d if d < 2**31 else 0, base, 7, count])
    _assert_compression_equals_the_numpy_encoder(per_mask)


def test_passes_bound_memory_without_changing_results(monkeypatch):
    from rfdetr_core import mask_rle_cuda

    masks = torch.rand(9, 20, 30, generator=torch.Generator().manual_seed(3)) > 0.3
    whole = encode_masks(masks)
    monkeypatch.setattr(mask_rle_cuda, "_PIXELS_PER_PASS", 2 * 20 * 30)  # two masks per pass
    assert encode_masks(masks) == whole


def test_rejects_wrong_input():
    with pytest.raises(ValueError, match="bool"):
        encode_masks(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        encode_masks(torch.zeros(4, 4, dtype=torch.bool))
    assert encode_masks(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def _detections(masks: torch.Tensor, rle: bool) -> Detections:
    n = masks.shape[0]
    return Detections(
        boxes=np.zeros((n, 4), np.float32),
        scores=np.linspace(0.9, 0.1, n).astype(np.float32),
        category_ids=np.ones(n, np.int64),
        class_names=["a"] * n,
        masks=None if rle else masks.numpy(),
        slots=np.zeros(n, np.int64),
        image_size=tuple(masks.shape[1:]),
        rles=encode_masks(masks) if rle else None,
    )


def test_rle_backed_detections_decode_on_access_and_give_the_same_coco():
    masks = torch.rand(4, 13, 21, generator=torch.Generator().manual_seed(5)) > 0.5
    dense, lazy = _detections(masks, False), _detections(masks, True)
    assert lazy.__dict__["masks"] is None  # nothing decoded yet
    assert lazy.to_coco(1) == dense.to_coco(1)
    assert lazy.__dict__["masks"] is None  # to_coco used the RLE as it is
    np.testing.assert_array_equal(lazy.masks, dense.masks)
    empty = _detections(torch.zeros(0, 5, 6, dtype=torch.bool), True)
    assert empty.masks.shape == (0, 5, 6)
    with pytest.raises(ValueError, match="one RLE per detection"):
        Detections(**{**lazy.__dict__, "rles": lazy.rles[:2], "masks": None})
