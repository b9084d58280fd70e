"""Image-mask alignment through every geometric transform of both pipelines; boxes = mask extents;
vanished instances dropped and counted; YAML pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rfdetr_core.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rfdetr_train.data import DatasetError, TrainTransform, ValTransform, load_dataset, load_pipeline
from rfdetr_train.data.albumentations_pipeline import AlbumentationsTransform, shipped_pipelines
from rfdetr_train.data.masks import decode

H, W = 120, 160
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
POLYS = [
    [10, 10, 70, 12, 60, 60, 12, 55],  # quadrilateral
    [90, 15, 150, 15, 120, 70],  # triangle
    None,  # RLE instance (a disk), see below
    [20, 75, 60, 75, 60, 110, 40, 90, 20, 110],  # concave
]


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    """One image whose instances are each painted in a unique pure colour on black."""
    root = tmp_path_factory.mktemp("painted")
    arr = np.zeros((H, W, 3), np.uint8)
    anns = []
    yy, xx = np.mgrid[0:H, 0:W]
    disk = ((xx - 115) ** 2 + (yy - 92) ** 2) <= 22**2
    for i, (poly, col) in enumerate(zip(POLYS, COLOURS)):
        if poly is None:
            rle = mask_utils.encode(np.asfortranarray(disk.astype(np.uint8)))
            seg = {"size": [H, W], "counts": rle["counts"].decode()}
        else:
            seg = [poly]
        # paint exactly the pixels COCO's rasteriser assigns to the instance
        arr[decode(seg, H, W)] = col
        anns.append({"id": i + 1, "image_id": 1, "category_id": i + 1, "segmentation": seg})
    img = Image.fromarray(arr)
    img.save(root / "p.png")
    coco = {
        "images": [{"id": 1, "file_name": "p.png", "width": W, "height": H}],
        "annotations": anns,
        "categories": [{"id": i + 1, "name": f"k{i}"} for i in range(4)],
    }
    (root / "a.json").write_text(json.dumps(coco))
    return load_dataset(root / "a.json")


def _unnormalise(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return img * std + mean  # [3, H, W] in [0, 1]


def _colour_share(img: torch.Tensor, mask: torch.Tensor, label: int) -> float:
    """Share of the mask's pixels that keep the instance's colour. A pixel keeps it when it is nearer to
    that colour than to the black background (every channel within 0.5): bilinear resampling blends the
    pixels on an edge, and this puts the line at 50% coverage, the mask's own boundary rule."""
    col = torch.tensor(COLOURS[label], dtype=torch.float32).view(3, 1) / 255
    pix = img[:, mask]  # [3, n]
    return float(((pix - col).abs().max(dim=0).values < 0.5).float().mean())


def _assert_aligned(sample, min_instances=1):
    img = _unnormalise(sample["image"])
    t = sample["target"]
    assert len(t["labels"]) >= min_instances
    for label, mask, box in zip(t["labels"].tolist(), t["masks"], t["boxes"]):
        ok = _colour_share(img, mask, label)
        assert ok >= 0.95, f"instance {label}: only {ok:.1%} of its mask pixels keep its colour"
        # the box equals the mask extent (pixel edges, normalised cxcywh)
        h, w = mask.shape
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        expect = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
        assert torch.allclose(box, expect.float(), atol=1e-6)


BUILTIN = {
    "val-resize": ValTransform(),
    "square-resize": TrainTransform(flip_p=0.0, crop_p=0.0),
    "flip": TrainTransform(flip_p=1.0, crop_p=0.0),
    "crop": TrainTransform(flip_p=0.0, crop_p=1.0),
    "crop+flip": TrainTransform(flip_p=1.0, crop_p=1.0),
}


@pytest.mark.parametrize("name", list(BUILTIN))
@pytest.mark.parametrize("size", [(128, 128), (96, 144)])
def test_builtin_pipelines_keep_masks_on_their_pixels(painted, name, size):
    ds = painted.dataset("train", BUILTIN[name], size, seed=3)
    from rfdetr_train.data import SampleKey

    for epoch in range(4):
        s = ds[SampleKey(0, epoch, size)]
        assert s["image"].shape == (3, *size) and s["target"]["masks"].shape[1:] == size
        _assert_aligned(s)
        assert s["dropped"] == 4 - len(s["target"]["labels"])


def test_alignment_check_catches_a_two_pixel_shift(painted):
    s = painted.dataset("train", ValTransform(), (H, W))[0]
    img = _unnormalise(s["image"])
    shares = [
        _colour_share(img, m.roll(2, dims=1), lab)
        for lab, m in zip(s["target"]["labels"].tolist(), s["target"]["masks"])
    ]
    assert min(shares) < 0.95


def test_flip_mirrors_and_val_keeps_source_size(painted):
    plain = painted.dataset("train", BUILTIN["square-resize"], (128, 128))[0]
    flipped = painted.dataset("train", BUILTIN["flip"], (128, 128))[0]
    assert torch.equal(plain["target"]["masks"].flip(-1), flipped["target"]["masks"])
    assert torch.allclose(plain["image"].flip(-1), flipped["image"])
    v = painted.dataset("val", ValTransform(), (96, 96)) if "val" in painted.splits else None
    assert v is None  # single file: only a train split
    s = painted.dataset("train", ValTransform(), (96, 96))[0]
    assert s["target"]["orig_size"].tolist() == [H, W] and s["target"]["size"].tolist() == [96, 96]


def _geometric_leaves(transform):
    import albumentations as A

    kids = getattr(transform, "transforms", None)
    if kids is not None:
        for k in kids:
            yield from _geometric_leaves(k)
    elif isinstance(transform, A.DualTransform):
        yield transform


@pytest.mark.parametrize("pipeline", ["default", "strong"])
def test_every_geometric_albumentations_transform_keeps_alignment(painted, pipeline):
    leaves = list(_geometric_leaves(load_pipeline(pipeline).compose))
    assert len(leaves) >= 3
    for leaf in leaves:
        leaf.p = 1.0
        ds = painted.dataset("train", AlbumentationsTransform([leaf], leaf.__class__.__name__), (128, 128))
        from rfdetr_train.data import SampleKey

        for epoch in range(3):
            _assert_aligned(ds[SampleKey(0, epoch, (128, 128))])


@pytest.mark.parametrize("pipeline", ["default", "strong"])
def test_whole_shipped_pipelines_run_and_are_deterministic(painted, pipeline):
    from rfdetr_train.data import SampleKey

    ds = painted.dataset("train", load_pipeline(pipeline), (96, 96), seed=1)
    a, b = ds[SampleKey(0, 2, (96, 96))], ds[SampleKey(0, 2, (96, 96))]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"]["masks"], b["target"]["masks"])
    assert set(shipped_pipelines()) >= {"default", "strong"}


def test_vanished_instances_are_dropped_and_counted(painted):
    import albumentations as A

    from rfdetr_train.data import collate

    # keep only the top-left 40x40 px: only the quadrilateral survives
    ds = painted.dataset("train", AlbumentationsTransform([A.Crop(0, 0, 40, 40)]), (64, 64))
    s = ds[0]
    assert s["target"]["labels"].tolist() == [0] and s["dropped"] == 3
    _assert_aligned(s)
    batch = collate([s, s])
    assert batch.images.shape == (2, 3, 64, 64) and batch.dropped == 6


def test_yaml_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("transforms:\n  - NoSuchTransform: {p: 1}\n")
    with pytest.raises(DatasetError, match="no transform named 'NoSuchTransform'"):
        load_pipeline(bad)
    bad.write_text("transforms:\n  - OneOf: {p: 1}\n")
    with pytest.raises(DatasetError, match="needs a non-empty 'transforms' list"):
        load_pipeline(bad)
    with pytest.raises(DatasetError, match="not a shipped pipeline"):
        load_pipeline("nope")
