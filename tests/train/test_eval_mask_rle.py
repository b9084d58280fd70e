"""The cropped, chunked logits -> RLE path equals full-size upsample + threshold + pycocotools encode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rfdetr_core.mask_rle import logits_to_rle
from rfdetr_train.evaluation.boundary import boundary_fn, boundary_rles, boundary_width, mask_boundary
from rfdetr_train.evaluation.coco_reference import logits_to_rle_naive

mask_utils = pytest.importorskip("pycocotools.mask")


def _blob_logits(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cy, cx = torch.rand(n, 1, 1, generator=g) * h, torch.rand(n, 1, 1, generator=g) * w
    r = 0.5 + torch.rand(n, 1, 1, generator=g) * h / 2
    out = 4.0 * (1.0 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)  # [n, h, w], positive inside a disc
    return out + 0.3 * torch.randn(n, h, w, generator=g)


@pytest.mark.parametrize(
    ("grid", "out", "budget", "host_encode"),
    [
        ((27, 27), (480, 640), 1 << 23, True),
        ((20, 31), (97, 203), 1 << 16, True),
        ((20, 31), (97, 203), 1 << 16, False),  # large masks through the device (run extraction) path
        ((16, 16), (64, 64), 1 << 16, False),
    ],
)
def test_fast_rle_equals_full_upsample(grid, out, budget, host_encode):
    logits = _blob_logits(20, *grid, seed=sum(out))
    logits[0] = -5.0  # empty mask
    logits[1] = 5.0  # full mask: runs continue from one column into the next
    logits[2, :, -1] = 3.0  # touches the right border
    logits[3, 0, 0] = 9.0  # a single positive cell in a corner
    fast, fast_area, bounds = logits_to_rle(
        logits, out, pixel_budget=budget, boundary=boundary_fn(3), host_encode_large=host_encode
    )
    ref, ref_area = logits_to_rle_naive(logits, out)
    assert len(fast) == len(ref) == 20
    diff = 0
    for a, b in zip(fast, ref, strict=True):
        assert list(a["size"]) == list(b["size"]) == list(out)
        diff += int(np.count_nonzero(mask_utils.decode(a) != mask_utils.decode(b)))
    # identical up to float rounding at the threshold: at most a couple of pixels in 20 masks
    assert diff <= 2, diff
    np.testing.assert_allclose(fast_area, ref_area, atol=2)
    assert fast_area[0] == 0 and fast_area[1] == out[0] * out[1]
    # boundaries eroded on the device crops equal those eroded from the decoded full-size masks
    ratio = 3 / np.hypot(*out)
    assert [b["counts"] for b in bounds] == [b["counts"] for b in boundary_rles(fast, ratio)]
    assert mask_utils.area(bounds[1]) == out[0] * out[1] - (out[0] - 6) * (out[1] - 6)


def test_fast_rle_identical_on_exact_grid():
    # integer scale factors and logits far from 0 at every pixel: no rounding room, must be bit-identical
    logits = torch.where(_blob_logits(12, 24, 32, seed=3) > 0, 2.0, -2.0)
    fast, _, none = logits_to_rle(logits, (96, 128))
    assert none is None
    ref, _ = logits_to_rle_naive(logits, (96, 128))
    assert [r["counts"] for r in fast] == [r["counts"] for r in ref]


def test_boundary_of_a_square():
    m = np.zeros((50, 60), dtype=bool)
    m[10:30, 20:45] = True
    b = mask_boundary(m, 2)
    inner = np.zeros_like(m)
    inner[12:28, 22:43] = True
    np.testing.assert_array_equal(b, m & ~inner)
    # the image border counts as background: a mask touching it has a boundary there
    full = np.ones((10, 10), dtype=bool)
    assert mask_boundary(full, 1).sum() == 100 - 64
    assert boundary_width(480, 640, 0.02) == 16
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    (brle,) = boundary_rles([rle], ratio=2 / np.hypot(50, 60))
    np.testing.assert_array_equal(mask_utils.decode(brle).astype(bool), b)
