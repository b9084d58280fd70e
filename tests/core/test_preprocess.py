"""rfdetr_core.preprocess: every input type, greyscale, 16-bit, non-square, settings round trip."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rfdetr_core.errors import ImageError
from rfdetr_core.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    load_image,
    preprocess,
    resize_normalize,
    to_float_rgb,
)


@pytest.fixture
def rgb8() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)


def test_numpy_uint8_is_hwc_rgb(rgb8):
    t = to_float_rgb(rgb8)
    assert t.shape == (3, 30, 50) and t.dtype == torch.float32
    # channel order kept: R of pixel (0, 0) is channel 0
    assert t[0, 0, 0].item() == pytest.approx(rgb8[0, 0, 0] / 255.0)
    assert t[2, 5, 7].item() == pytest.approx(rgb8[5, 7, 2] / 255.0)


def test_pil_tensor_numpy_and_path_agree(rgb8, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(rgb8).save(path)
    ref = to_float_rgb(rgb8)
    for source in (Image.fromarray(rgb8), torch.from_numpy(rgb8).permute(2, 0, 1), path, str(path)):
        torch.testing.assert_close(to_float_rgb(source), ref)
    # float tensors in [0, 1] pass through
    torch.testing.assert_close(to_float_rgb(ref.clone()), ref)


def test_greyscale_becomes_three_equal_channels(rgb8, tmp_path):
    grey = rgb8[:, :, 0]
    for source in (grey, grey[:, :, None], Image.fromarray(grey), torch.from_numpy(grey)[None]):
        t = to_float_rgb(source)
        assert t.shape == (3, 30, 50)
        torch.testing.assert_close(t[0], t[1])
        torch.testing.assert_close(t[0], t[2])
        assert t[0, 3, 4].item() == pytest.approx(grey[3, 4] / 255.0)


def test_sixteen_bit_uses_full_range(tmp_path):
    arr = np.array([[0, 256, 65535]], dtype=np.uint16)
    t = to_float_rgb(arr)
    assert t[0, 0].tolist() == pytest.approx([0.0, 256 / 65535, 1.0])
    # a 16-bit greyscale PNG read from disk follows the same rule
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 6), 40000, dtype=np.uint16)).save(path)
    t = to_float_rgb(path)
    assert t.shape == (3, 4, 6)
    assert t.max().item() == pytest.approx(40000 / 65535, abs=1e-6)


def test_rgba_and_palette_drop_alpha(rgb8):
    rgba = np.concatenate([rgb8, np.full((30, 50, 1), 7, np.uint8)], axis=2)
    torch.testing.assert_close(to_float_rgb(rgba), to_float_rgb(rgb8))
    pal = Image.fromarray(rgb8).convert("P")
    assert to_float_rgb(pal).shape == (3, 30, 50)


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="HxWx3"):
        to_float_rgb(np.zeros((3, 20, 20, 2), np.uint8))
    with pytest.raises(ImageError, match="dtype"):
        to_float_rgb(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(ImageError, match="not found"):
        to_float_rgb(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="Cannot read image"):
        to_float_rgb(tmp_path / "bad.jpg")
    with pytest.raises(ImageError, match="Unsupported image input"):
        to_float_rgb(12)


def test_preprocess_non_square_batch_and_source_sizes(rgb8):
    batch, sizes = preprocess([rgb8, rgb8[:10, :20]], size=(24, 48))
    assert batch.shape == (2, 3, 24, 48)
    assert sizes == [(30, 50), (10, 20)]
    # a 4-d tensor is a batch
    batch, sizes = preprocess(torch.rand(3, 3, 16, 8), size=(32, 16))
    assert batch.shape == (3, 3, 32, 16) and sizes == [(16, 8)] * 3


def test_normalisation_uses_config():
    x = torch.full((3, 4, 4), 0.5)
    out = resize_normalize(x, (4, 4))
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    cfg = PreprocessConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.testing.assert_close(resize_normalize(x, (4, 4), cfg)[0], x)


def test_jpeg_draft_keeps_source_size(tmp_path):
    big = (np.random.default_rng(1).random((400, 600, 3)) * 255).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=90)
    t, size = load_image(path, min_size=(50, 50))
    assert size == (400, 600)  # the file's own size, whatever scale it was decoded at
    assert t.shape[1] < 400  # decoded at reduced scale
    assert t.shape[1] >= 50 and t.shape[2] >= 50
    _, sizes = preprocess(path, size=(48, 48))
    assert sizes == [(400, 600)]


def test_config_round_trips_through_json():
    cfg = PreprocessConfig(antialias=False, interpolation="bicubic", mean=(0.1, 0.2, 0.3))
    assert PreprocessConfig.from_json(cfg.to_json()) == cfg
    assert PreprocessConfig.from_json(None) == PreprocessConfig()
    with pytest.raises(ValueError, match="Unknown preprocessing keys"):
        PreprocessConfig.from_json({"resize": "stretch", "bogus": 1})
    with pytest.raises(ValueError, match="resize must be"):
        PreprocessConfig(resize="crop")


def test_file_object_decodes_like_its_path(tmp_path):
    import io

    big = (np.random.default_rng(2).random((400, 600, 3)) * 255).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=90)
    from_path, size_path = load_image(path, min_size=(50, 50))
    from_bytes, size_bytes = load_image(io.BytesIO(path.read_bytes()), min_size=(50, 50))
    assert size_bytes == size_path == (400, 600)
    torch.testing.assert_close(from_bytes, from_path, rtol=0, atol=0)  # same draft scale, same pixels
    with pytest.raises(ImageError, match="Cannot read image"):
        load_image(io.BytesIO(b"not an image"))


@pytest.mark.parametrize("source", ["pil", "read-only numpy"])
def test_uint8_fast_path_warns_nothing(source):
    """A PIL image or a read-only uint8 array goes through the uint8 fast path without torch's not-writable warning.
    torch gives that warning once per process, so each case runs in a fresh interpreter that records warnings
    (``-W error`` does not turn this one into an exception: it would pass either way)."""
    make = (
        "img = Image.fromarray(np.zeros((20, 30, 3), np.uint8))"
        if source == "pil"
        else "img = np.zeros((20, 30, 3), np.uint8); img.setflags(write=False)"
    )
    code = "\n".join(
        [
            "import warnings, numpy as np",
            "from PIL import Image",
            "from rfdetr_core.preprocess import preprocess",
            make,
            "with warnings.catch_warnings(record=True) as caught:",
            "    warnings.simplefilter('always')",
            "    x, sizes = preprocess([img], (16, 16), device='cpu')",
            "assert sizes == [(20, 30)], sizes",
            "print([str(w.message) for w in caught if 'not writable' in str(w.message)])",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
