"""``predict(mask_format=...)``: RLE results equal the dense ones; CPU keeps dense masks by default."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rfdetr_core import RFDETR
from rfdetr_core.preprocess import preprocess, resize_normalize, to_float_rgb


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return RFDETR("seg-tiny", device="cpu", resolution=(64, 96))


def _image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_rle_masks_equal_dense_masks(tiny):
    images = [_image(37, 53), _image(20, 31, 1)]
    dense = tiny.predict(images, threshold=0.0)  # CPU default: dense
    rle = tiny.predict(images, threshold=0.0, mask_format="rle")
    for d, r in zip(dense, rle, strict=True):
        assert d.rles is None and r.rles is not None and len(r) == len(d) > 0
        np.testing.assert_array_equal(d.scores, r.scores)
        assert r.to_coco(3) == d.to_coco(3)
        np.testing.assert_array_equal(r.masks, d.masks)


def test_unknown_mask_format_is_an_error(tiny):
    with pytest.raises(ValueError, match="mask_format"):
        tiny.predict(_image(10, 10), mask_format="png")


def test_batched_preprocess_equals_float_conversion_one_image_at_a_time(tiny):
    same = [_image(30, 40, s) for s in range(3)]
    mixed = [*same, torch.from_numpy(_image(22, 33, 9)).permute(2, 0, 1), np.float32(_image(30, 40, 4)) / 255]
    x, sizes = preprocess(mixed, (64, 96))
    # the reference: one image at a time, converted to float on the host first (the path before batching)
    singles = [resize_normalize(to_float_rgb(m), (64, 96)) for m in mixed]
    torch.testing.assert_close(x, torch.cat(singles), rtol=0, atol=1e-6)
    assert sizes == [(30, 40)] * 3 + [(22, 33), (30, 40)]


@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.parametrize(
    "sizes",
    [[(30, 41), (17, 23), (30, 41)], [(30, 41)] * 3],  # two source sizes, not adjacent; one (no regrouping)
    ids=["two_sizes", "one_size"],
)
def test_whole_batch_postprocess_equals_per_image(threshold, sizes):
    from rfdetr_core.postprocess import postprocess

    g = torch.Generator().manual_seed(7)
    b, q, k = 3, 12, 5
    outputs = {
        "pred_logits": torch.randn(b, q, k, generator=g),
        "pred_boxes": torch.rand(b, q, 4, generator=g),
        "pred_masks": torch.randn(b, q, 8, 10, generator=g),
    }
    valid = torch.tensor([True, False, True, True, True])
    args = dict(num_select=20, threshold=threshold, valid_slots=valid)
    per_image = postprocess(outputs, sizes, batched=False, **args)
    for fmt in ("bool", "rle"):
        whole = postprocess(outputs, sizes, batched=True, mask_format=fmt, host=True, **args)
        for a, w in zip(per_image, whole, strict=True):
            for key in ("scores", "labels", "queries", "boxes"):
                torch.testing.assert_close(w[key], a[key], rtol=0, atol=0)
            if fmt == "bool":
                torch.testing.assert_close(w["masks"], a["masks"], rtol=0, atol=0)
            else:
                from rfdetr_core.mask_rle import encode_masks

                assert w["rles"] == encode_masks(a["masks"])
    assert sum(len(r["scores"]) for r in per_image) > 0


def test_batched_preprocess_reads_paths_and_file_objects_like_load_image(tmp_path):
    import io

    from PIL import Image

    from rfdetr_core.preprocess import load_image

    arr = _image(30, 40, 5)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    x, sizes = preprocess([path, io.BytesIO(path.read_bytes())], (64, 96))
    ref = resize_normalize(load_image(path)[0], (64, 96))
    torch.testing.assert_close(x, torch.cat([ref, ref]), rtol=0, atol=1e-6)
    assert sizes == [(30, 40), (30, 40)]


def test_default_mask_format_is_rle_on_cuda_devices_only():
    """The one rule behind ``predict(mask_format="auto")`` and rfdetr-export's benchmark."""
    from rfdetr_core.postprocess import default_mask_format

    assert [default_mask_format(d) for d in ("cuda", "cuda:1", torch.device("cuda", 0))] == ["rle"] * 3
    assert [default_mask_format(d) for d in ("cpu", torch.device("cpu"))] == ["bool"] * 2
