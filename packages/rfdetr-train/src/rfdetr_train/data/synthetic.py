"""The built-in synthetic instance-segmentation dataset (for tests, the demo and training without --data).

Written once as COCO ``train.json`` / ``val.json`` / ``test.json`` + ``images/`` to
``RFDETR_HOME/datasets/synthetic-v<GENERATOR_VERSION>-s<seed>/``, atomically (built in a temporary folder,
then renamed) under a file lock, so concurrent processes generate it once.

Difficulty (fixed; do not ease it to make a demo pass): 3 classes told apart by shape only (circle,
triangle, star; every object gets a random colour and texture, independent of its class), 1-6 objects per
image, each 12-40% of the image's shorter side across, randomly rotated, later objects occluding earlier
ones while every object keeps at least 30% of its pixels visible; backgrounds are smooth colour noise plus
pixel noise, with clutter (lines, dots, arcs). Image sizes vary in 192-256 px per side. Train, validation
and test images come from different random streams of the seed. Unoccluded objects are stored as polygons,
occluded ones as compressed RLE of their visible part (so both encodings are exercised).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1
CLASSES = ("circle", "triangle", "star")
SPLIT_SIZES = {"train": 320, "val": 64, "test": 64}
MIN_VISIBLE = 0.30
SIDE_RANGE = (192, 256)
EXTENT_RANGE = (0.12, 0.40)
OBJECTS_RANGE = (1, 6)


def _shape_polygon(cls: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Outline ``[K, 2]`` (x, y) of class ``cls`` centred at (cx, cy), circumradius ``radius``."""
    if cls == 0:  # circle
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        r = np.full_like(t, radius)
    elif cls == 1:  # equilateral triangle
        t = angle + np.arange(3) * 2 * np.pi / 3
        r = np.full(3, radius)
    else:  # five-pointed star, inner radius 0.45
        t = angle + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _background(rng: np.random.Generator, h: int, w: int):
    from PIL import Image, ImageDraw

    grid = rng.uniform(0, 255, size=(4 + int(rng.integers(5)), 4 + int(rng.integers(5)), 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
    bg += rng.standard_normal(size=bg.shape, dtype=np.float32) * rng.uniform(4, 18)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):  # clutter: lines, dots and arcs in random colours
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if kind == 0:
            draw.line([x, y, x + rng.uniform(-w, w) / 2, y + rng.uniform(-h, h) / 2], fill=col,
                      width=int(rng.integers(1, 4)))  # fmt: skip
        elif kind == 1:
            r = rng.uniform(1, 4)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
        else:
            r = rng.uniform(8, 30)
            a0 = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], a0, a0 + rng.uniform(40, 160), fill=col, width=2)
    return img


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(0, 255, size=3)
    tex = base.astype(np.float32) + rng.standard_normal(size=(h, w, 3), dtype=np.float32) * rng.uniform(5, 30)
    if rng.random() < 0.5:  # stripes
        period = rng.uniform(4, 12)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        d = np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy
        tex += (np.sin(d * (2 * np.pi / period)) * rng.uniform(10, 40))[..., None]
    return np.clip(tex, 0, 255).astype(np.uint8)


def _render(rng: np.random.Generator):
    """One image -> (PIL image, [(class, polygon [K,2], visible mask [h,w] bool, occluded)])."""
    from PIL import Image

    from rfdetr_train.data.masks import rasterize_polygons

    w, h = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    img = _background(rng, h, w)
    arr = np.array(img)
    objects: list = []  # [cls, polygon, full mask, visible mask]
    want = int(rng.integers(OBJECTS_RANGE[0], OBJECTS_RANGE[1] + 1))
    for _ in range(want * 20):
        if len(objects) == want:
            break
        cls = int(rng.integers(len(CLASSES)))
        extent = rng.uniform(*EXTENT_RANGE) * min(h, w)
        radius = extent / 2
        cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
        # rounded as stored in the JSON, so the stored polygon rasterises to exactly the painted pixels
        poly = np.round(_shape_polygon(cls, cx, cy, radius, rng.uniform(0, 2 * np.pi)), 2)
        # COCO's own rasteriser, so the painted pixels are exactly the annotation's mask
        mask = rasterize_polygons([poly], h, w)
        if mask.sum() < 16:
            continue
        # every earlier object must keep MIN_VISIBLE of its pixels once this one is on top
        if any(((o[3] & ~mask).sum() < MIN_VISIBLE * o[2].sum()) for o in objects):
            continue
        for o in objects:
            o[3] = o[3] & ~mask
        objects.append([cls, poly, mask, mask.copy()])
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        box = mask[y0:y1, x0:x1]
        arr[y0:y1, x0:x1][box] = _texture(rng, y1 - y0, x1 - x0)[box]
    out = [(o[0], o[1], o[3], bool((o[3] != o[2]).any())) for o in objects]
    return Image.fromarray(arr), out


def generate_split(out_dir: Path, split: str, seed: int, count: int) -> dict:
    """Render ``count`` images of ``split`` into ``out_dir/images/<split>/`` and return the COCO dict."""
    from pycocotools import mask as mask_utils

    stream = {"train": 0, "val": 1, "test": 2}.get(split, 3)
    rng = np.random.default_rng((int(seed), GENERATOR_VERSION, stream))
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    coco = {
        "info": {"description": f"rfdetr-mask synthetic v{GENERATOR_VERSION}, seed {seed}, {split}"},
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    for i in range(count):
        img, objects = _render(rng)
        name = f"images/{split}/{i:05d}.jpg"
        img.save(out_dir / name, quality=92)
        image_id = i + 1
        coco["images"].append({"id": image_id, "file_name": name, "width": img.width, "height": img.height})
        for cls, poly, visible, occluded in objects:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            if occluded:
                seg = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
            else:
                seg = [[float(v) for v in poly.reshape(-1)]]
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "segmentation": seg,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    return coco


def generate(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Write the dataset (``sizes``: images per split) to ``out_dir`` (not atomic; see
    :func:`synthetic_dataset_dir`). Returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, count in (sizes or SPLIT_SIZES).items():
        coco = generate_split(out_dir, split, seed, count)
        (out_dir / f"{split}.json").write_text(json.dumps(coco), encoding="utf-8")
    return out_dir


def synthetic_dataset_dir(seed: int = 0) -> Path:
    """The folder of the synthetic dataset for ``seed``, generated on first use.

    ``RFDETR_HOME/datasets/synthetic-v<GENERATOR_VERSION>-s<seed>/`` holding ``train.json``, ``val.json``,
    ``test.json`` and ``images/``. Safe to call from several processes at once: one generates under a file
    lock into a temporary folder and renames it into place; the others wait and reuse it.
    """
    from filelock import FileLock

    from rfdetr_core.paths import datasets_dir

    root = datasets_dir(create=True)
    final = root / f"synthetic-v{GENERATOR_VERSION}-s{int(seed)}"
    if (final / "train.json").is_file():
        return final
    with FileLock(str(final) + ".lock"):
        if (final / "train.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            generate(tmp, seed)
            if final.exists():  # an incomplete folder from an older, interrupted layout
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m rfdetr_train.data.synthetic OUT_DIR``: write a copy of the synthetic dataset to a folder,
    e.g. as sample data for the documented commands (COCO JSONs per split + images; made here, no licence
    strings attached)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m rfdetr_train.data.synthetic",
        description="Write the built-in synthetic dataset (3 shape classes, COCO format) to a folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", metavar="OUT_DIR", help="folder to write train.json, val.json, test.json, images/")
    p.add_argument("--seed", type=int, default=0, help="random seed (the demo uses the dataset of seed 0)")
    for split, count in SPLIT_SIZES.items():
        p.add_argument(f"--{split}", type=int, default=count, metavar="N", help=f"images in {split}")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "train.json").exists():
        p.error(f"{out} already holds a dataset (train.json); choose an empty folder")
    sizes = {split: getattr(args, split) for split in SPLIT_SIZES}
    generate(out, args.seed, sizes)
    total = sum(sizes.values())
    print(f"wrote {total} images ({', '.join(f'{k} {v}' for k, v in sizes.items())}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
