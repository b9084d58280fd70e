"""The dataset checks run by ``rfdetr-train check`` and, identically, before every training run.

:func:`check_split` validates one COCO dict (structure, ids, image files, masks, bounds) and returns a
cleaned copy holding only what is usable, so ``--skip-invalid`` training drops exactly what the report
names. :func:`check_dataset` adds the cross-split warnings (rare classes, classes in one split only).
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rfdetr_train.data.findings import FindingList
from rfdetr_train.data.layout import DatasetSource, SplitSource
from rfdetr_train.data.masks import mask_area, rle_problem

REQUIRED_TOP = ("images", "annotations", "categories")
REQUIRED_IMAGE = ("id", "file_name", "width", "height")
REQUIRED_ANN = ("id", "image_id", "category_id", "segmentation")
REQUIRED_CAT = ("id", "name")
# Instances of a class below which its AP is mostly noise.
FEW_INSTANCES = 10
DEFAULT_MAX_INSTANCES = 100  # queries of the smaller published seg models (seg-nano / seg-small)


def overrun_tolerance(side: int) -> float:
    """Pixels a polygon or box may stick out of the image before it is an error (max(1 px, 1% of side))."""
    return max(1.0, 0.01 * side)


@dataclass
class ImageFileInfo:
    """What the image file's header says (``mode`` is PIL's: ``L``, ``RGB``, ``I;16``...)."""

    width: int
    height: int
    mode: str


@dataclass
class CheckedSplit:
    """A split after the checks: ``coco`` holds only the usable images and annotations."""

    source: SplitSource
    coco: dict
    files: dict[int, ImageFileInfo] = field(default_factory=dict)
    dropped_images: int = 0
    dropped_annotations: int = 0
    clamped_annotations: int = 0
    areas: dict = field(default_factory=dict)  # annotation id -> mask pixels


def _ident(x) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def _read_header(path: Path) -> ImageFileInfo | Exception:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return ImageFileInfo(im.width, im.height, im.mode)
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        return exc


@dataclass
class _Reporter:
    """Error findings of one split, every one naming the split's file."""

    findings: FindingList
    origin: str
    split: str

    def __call__(self, code: str, msg: str, **where) -> None:
        self.findings.error(code, f"{self.origin}: {msg}", file=self.origin, split=self.split, **where)

    def warning(self, code: str, msg: str, **where) -> None:
        self.findings.warning(code, f"{self.origin}: {msg}", file=self.origin, split=self.split, **where)


@dataclass
class _KeptAnnotations:
    """The usable annotations of a split and what the checks noted about them."""

    annotations: list = field(default_factory=list)
    clamped: list = field(default_factory=list)  # ids of annotations slightly outside their image
    areas: dict = field(default_factory=dict)  # annotation id -> mask pixels
    per_image: Counter = field(default_factory=Counter)  # image id -> non-crowd instances


def check_split(
    split: SplitSource,
    findings: FindingList,
    *,
    check_files: bool = True,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    no_masks_reported: bool = False,
) -> CheckedSplit | None:
    """Validate one split; ``None`` when its top level is unusable (missing 'images' / 'categories').

    Sections, in this order (so the findings keep their order): top level, categories, images, image files,
    annotations, then the split-wide warnings. A split whose annotations all lack 'segmentation' (a box-only
    export) gets one ``no-masks`` error, not one per annotation; with ``no_masks_reported`` the caller has
    already said so for the whole dataset.
    """
    coco = split.coco
    err = _Reporter(findings, str(split.origin), split.name)
    missing = [k for k in REQUIRED_TOP if not isinstance(coco.get(k), list)]
    if missing:
        # without images or categories nothing in the split is usable, not even with --skip-invalid
        unusable = "images" in missing or "categories" in missing
        err("missing-section" if unusable else "missing-key",
            f"missing or non-list top-level key(s) {missing}; a COCO instance file needs 'images', "
            "'annotations' and 'categories' lists.")  # fmt: skip
        if unusable:
            return None
    cats = _check_categories(coco["categories"], err)
    images = _check_images(coco["images"], err)
    files = _check_files(split.image_root, images, err) if check_files and images else {}
    kept = _check_annotations(coco, cats, images, err, no_masks_reported)
    _warn_about_split(kept, images, max_instances, bool(coco.get("annotations")), err)
    out = {k: v for k, v in coco.items() if k not in REQUIRED_TOP}
    out.update(images=list(images.values()), annotations=kept.annotations, categories=list(cats.values()))
    n_ann = len(coco.get("annotations") or [])
    return CheckedSplit(
        split,
        out,
        files,
        dropped_images=len(coco["images"]) - len(images),
        dropped_annotations=n_ann - len(kept.annotations),
        clamped_annotations=len(kept.clamped),
        areas=kept.areas,
    )


def _check_categories(categories: list, err: _Reporter) -> dict:
    """``category id -> category`` of the well-formed categories (the first of a duplicated id)."""
    cats: dict = {}
    for i, c in enumerate(categories):
        miss = [k for k in REQUIRED_CAT if not isinstance(c, dict) or k not in c]
        if miss:
            err("missing-key", f"category #{i} lacks {miss}; every category needs 'id' and 'name'.")
            continue
        if not _ident(c["id"]):
            err("missing-key", f"category #{i} has a non-integer id {c['id']!r}.")
            continue
        if c["id"] in cats:
            err("duplicate-id", f"category id {c['id']} is used twice ({cats[c['id']]['name']!r} and "
                f"{c['name']!r}); give each category its own id.")  # fmt: skip
            continue
        cats[c["id"]] = c
    return cats


def _check_images(entries: list, err: _Reporter) -> dict:
    """``image id -> image`` of the well-formed image entries (ids, file name, positive integer size)."""
    images: dict = {}
    for i, im in enumerate(entries):
        miss = [k for k in REQUIRED_IMAGE if not isinstance(im, dict) or k not in im]
        if miss:
            iid = im.get("id") if isinstance(im, dict) else None
            err("missing-key", f"image #{i} (id {iid}) lacks {miss}; every image needs 'id', 'file_name', "
                "'width' and 'height'.", image_id=iid, dropped=1)  # fmt: skip
            continue
        if not _ident(im["id"]):
            err("missing-key", f"image #{i} has a non-integer id {im['id']!r}.", dropped=1)
            continue
        if im["id"] in images:
            err("duplicate-id", f"image id {im['id']} is used twice ({images[im['id']]['file_name']} and "
                f"{im['file_name']}); image ids must be unique.", image_id=im["id"], dropped=1)  # fmt: skip
            continue
        if (
            not (isinstance(im["width"], int) and isinstance(im["height"], int))
            or min(im["width"], im["height"]) <= 0
        ):
            err("missing-key", f"image id {im['id']} ({im['file_name']}) has invalid width/height "
                f"{im['width']!r}x{im['height']!r}; they must be positive integers.", image_id=im["id"], dropped=1)  # fmt: skip
            continue
        images[im["id"]] = im
    return images


def _check_files(image_root: Path, images: dict, err: _Reporter) -> dict[int, ImageFileInfo]:
    """Read every image file's header (8 threads); images whose file is missing, unreadable or of another
    size than the JSON says are removed from ``images``. Returns ``image id -> header`` of the others."""
    files: dict = {}
    paths = {iid: image_root / im["file_name"] for iid, im in images.items()}
    with ThreadPoolExecutor(max_workers=8) as pool:
        headers = dict(zip(paths, pool.map(_read_header, paths.values())))
    for iid, info in headers.items():
        im, path = images[iid], paths[iid]
        if isinstance(info, Exception):
            if not path.exists():
                err("image-missing", f"image id {iid}: file {path} does not exist. Check the path (or "
                    "pass --images DIR for the image folder), or remove the image.", image_id=iid, dropped=1)  # fmt: skip
            else:
                err("image-unreadable", f"image id {iid}: cannot read {path} ({info}). Replace the file "
                    "or remove the image.", image_id=iid, dropped=1)  # fmt: skip
            del images[iid]
        elif (info.width, info.height) != (im["width"], im["height"]):
            err("size-mismatch", f"image id {iid}: {path} is {info.width}x{info.height} (WxH) but the "
                f"JSON says {im['width']}x{im['height']}. Fix 'width'/'height' (or re-export).",
                image_id=iid, dropped=1)  # fmt: skip
            del images[iid]
        else:
            files[iid] = info
    return files


def _check_annotations(
    coco: dict, cats: dict, images: dict, err: _Reporter, no_masks_reported: bool
) -> _KeptAnnotations:
    """The annotations whose ids, category, image and shape are usable; one error per dropped annotation
    (none for those of an image dropped above: that image's error counts them)."""
    kept = _KeptAnnotations()
    seen_ann: set = set()
    valid_image_ids = {im.get("id") for im in coco["images"] if isinstance(im, dict) and _ident(im.get("id"))}
    raw_anns = coco.get("annotations") or []
    if box_only_count(coco):
        if not no_masks_reported:
            err("no-masks", no_masks_message(f"none of the {len(raw_anns)} annotations of this split"),
                dropped=len(raw_anns))  # fmt: skip
        raw_anns = []
    for i, a in enumerate(raw_anns):
        src = f" ({a['source']})" if isinstance(a, dict) and "source" in a else ""
        miss = [k for k in REQUIRED_ANN if not isinstance(a, dict) or k not in a]
        aid = a.get("id") if isinstance(a, dict) else None
        if miss:
            err("missing-key", f"annotation #{i} (id {aid}){src} lacks {miss}; instance annotations need "
                "'id', 'image_id', 'category_id' and 'segmentation'.", ann_id=aid, dropped=1)  # fmt: skip
            continue
        if aid in seen_ann:
            err("duplicate-id", f"annotation id {aid} is used twice; annotation ids must be unique.",
                ann_id=aid, image_id=a["image_id"], dropped=1)  # fmt: skip
            continue
        seen_ann.add(aid)
        if a["category_id"] not in cats:
            err("unknown-category", f"annotation id {aid}{src} points to category {a['category_id']}, which "
                f"is not in 'categories' (ids {sorted(cats)[:10]}). Add the category or fix the id.",
                ann_id=aid, image_id=a["image_id"], dropped=1)  # fmt: skip
            continue
        im = images.get(a["image_id"])
        if im is None:
            if a["image_id"] in valid_image_ids:  # its image was dropped above; counted there
                continue
            err("unknown-image", f"annotation id {aid}{src} points to image {a['image_id']}, which is not in "
                "'images'. Add the image or delete the annotation.", ann_id=aid, image_id=a["image_id"], dropped=1)  # fmt: skip
            continue
        problem, overrun, area = _shape_problem(a, im["height"], im["width"])
        if problem is not None:
            where = f"annotation id {aid} (image {im['id']}, {im['file_name']}){src}"
            err(problem[0], f"{where} {problem[1]}.", ann_id=aid, image_id=im["id"], dropped=1)
            continue
        if overrun > 0:
            kept.clamped.append(aid)
        if not a.get("iscrowd", 0):
            kept.per_image[im["id"]] += 1
        kept.annotations.append(a)
        kept.areas[aid] = area
    return kept


def _shape_problem(a: dict, h: int, w: int) -> tuple[tuple[str, str] | None, float, int]:
    """``(problem, overrun, area)`` of one annotation on an ``h x w`` image: ``problem`` is ``(code, what is
    wrong)`` or ``None``; ``overrun`` the most pixels a polygon or the bbox reaches outside the image (within
    the tolerance it is clamped later); ``area`` the mask's pixels (0 when there is a problem)."""
    seg = a["segmentation"]
    if isinstance(seg, list):
        problem, overrun = _polygon_problem(seg, h, w)
    elif isinstance(seg, dict):
        why = rle_problem(seg, h, w)
        problem = (
            ("rle-invalid", f"has an unusable RLE mask: {why}. Re-encode it for this image") if why else None
        )
        overrun = 0.0
    else:
        problem = ("missing-key", f"has a segmentation of type {type(seg).__name__}; use polygons or RLE")
        overrun = 0.0
    bbox = a.get("bbox")
    if problem is None and isinstance(bbox, list) and len(bbox) == 4:
        bx, by, bw, bh = bbox
        bo_x, bo_y = max(-bx, bx + bw - w), max(-by, by + bh - h)
        if bo_x > overrun_tolerance(w) or bo_y > overrun_tolerance(h):
            problem = ("out-of-bounds", f"has a bbox {bbox} reaching outside the {w}x{h} image by more "
                       f"than {overrun_tolerance(max(w, h)):.0f} px. Fix the box (xywh in pixels)")  # fmt: skip
        overrun = max(overrun, bo_x, bo_y)
    area = mask_area(seg, h, w) if problem is None else 0
    if problem is None and area == 0:
        problem = ("empty-mask", "has an empty mask (zero pixels). Delete it or redraw the outline")
    return problem, overrun, area


def _polygon_problem(seg: list, h: int, w: int) -> tuple[tuple[str, str] | None, float]:
    """``(problem, overrun)`` of a polygon segmentation (see :func:`_shape_problem`); the first problem wins."""
    overrun = 0.0
    problem = ("polygon-too-short", "has an empty polygon list") if not seg else None
    for poly in seg:
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
            return (
                "missing-key",
                "has a polygon that is not a flat list of numbers [x1, y1, x2, y2, ...]",
            ), overrun
        if len(poly) < 6 or len(poly) % 2:
            return ("polygon-too-short", f"has a polygon with {len(poly) // 2} point(s) "
                    f"({len(poly)} numbers); polygons need at least 3 x,y points"), overrun  # fmt: skip
        if any(not math.isfinite(v) for v in poly):
            return ("polygon-too-short", "has a polygon with NaN or infinite coordinates"), overrun
        xs, ys = poly[0::2], poly[1::2]
        overrun = max(overrun, -min(xs), max(xs) - w, -min(ys), max(ys) - h)
        if max(-min(xs), max(xs) - w) > overrun_tolerance(w) or max(
            -min(ys), max(ys) - h
        ) > overrun_tolerance(h):
            return ("out-of-bounds", f"has polygon points outside the {w}x{h} image (x {min(xs):.1f}.."
                    f"{max(xs):.1f}, y {min(ys):.1f}..{max(ys):.1f}); more than "
                    f"{overrun_tolerance(max(w, h)):.0f} px is an error. Fix the coordinates "
                    "(are they normalised, or for another image size?)"), overrun  # fmt: skip
    return problem, overrun


def _warn_about_split(
    kept: _KeptAnnotations, images: dict, max_instances: int, had_annotations: bool, err: _Reporter
) -> None:
    """The split-wide warnings: clamped annotations, crowded images, no usable annotation."""
    if kept.clamped:
        err.warning(
            "clamped",
            f"{len(kept.clamped)} annotation(s) reach up to {overrun_tolerance(1):.0f} px (or 1% of the "
            f"side) outside their image and are clamped (first ids: {kept.clamped[:5]}).",
        )
    crowded = [(n, iid) for iid, n in kept.per_image.items() if n > max_instances]
    if crowded:
        n, iid = max(crowded)
        err.warning(
            "too-many-instances",
            f"{len(crowded)} image(s) hold more instances than the model's {max_instances} queries "
            f"(most: image {iid} with {n}); the surplus cannot be detected. Use a variant with more queries "
            "(--num-queries) or tile the images.",
            image_id=iid,
        )
    if not kept.annotations and images:
        why = "no annotations" if not had_annotations else "no usable annotations left"
        err.warning(
            "no-annotations",
            f"{why} in this split ({len(images)} images). Evaluated on it, every AP and AR is -1 "
            "(nothing to measure, as pycocotools reports it); trained on it, the model only sees background.",
        )


def box_only_count(coco: dict) -> int:
    """Number of annotations when there are some and none has a 'segmentation' (boxes only), else 0."""
    anns = coco.get("annotations")
    if not isinstance(anns, list) or not anns:
        return 0
    return 0 if any(not isinstance(a, dict) or "segmentation" in a for a in anns) else len(anns)


def no_masks_message(which: str) -> str:
    return (
        f"this dataset has no masks: {which} has a 'segmentation' (boxes only). RF-DETR-Seg learns instance "
        "masks; export the dataset with polygons or RLE masks (COCO segmentation, YOLO-seg), or draw them."
    )


def grouping_categories(checked: dict[str, CheckedSplit]) -> list:
    """Ids of categories that only group the others (Roboflow exports add one: the dataset's name, the
    supercategory of every real class, with no annotations); they are no training class."""
    cats = {c["id"]: c for s in checked.values() for c in s.coco["categories"]}
    used = {a["category_id"] for s in checked.values() for a in s.coco["annotations"]}
    supers = {c.get("supercategory") for c in cats.values()}
    if len(cats) < 2:
        return []
    return [cid for cid, c in cats.items() if cid not in used and c.get("name") in supers]


def check_dataset(
    source: DatasetSource, *, check_files: bool = True, max_instances: int = DEFAULT_MAX_INSTANCES
) -> dict[str, CheckedSplit]:
    """Check every split of ``source`` (findings go to ``source.findings``) and add cross-split warnings."""
    checked = {}
    box_only = {n: box_only_count(s.coco) for n, s in source.splits.items() if isinstance(s.coco, dict)}
    with_anns = [
        n for n, s in source.splits.items() if isinstance(s.coco, dict) and s.coco.get("annotations")
    ]
    whole = bool(with_anns) and all(box_only.get(n) for n in with_anns)
    if whole:  # one message for the dataset instead of one per split (or per annotation)
        total = sum(box_only.values())
        source.findings.error(
            "no-masks",
            no_masks_message(f"none of its {total} annotations ({', '.join(with_anns)})"),
            dropped=total,
        )
    for name, split in source.splits.items():
        result = check_split(
            split,
            source.findings,
            check_files=check_files,
            max_instances=max_instances,
            no_masks_reported=whole,
        )
        if result is not None:
            checked[name] = result
    for cid in grouping_categories(checked):
        name = next(c["name"] for s in checked.values() for c in s.coco["categories"] if c["id"] == cid)
        source.notes.append(
            f"Category {cid} ({name!r}) only groups the other categories and has no annotations; it is not "
            "a training class."
        )
    counts = {
        n: Counter(a["category_id"] for a in c.coco["annotations"] if not a.get("iscrowd", 0))
        for n, c in checked.items()
    }
    names = {c["id"]: c["name"] for s in checked.values() for c in s.coco["categories"]}
    main = "train" if "train" in checked else next(iter(checked), None)
    if main is not None:
        rare = sorted((n, cid) for cid, n in counts[main].items() if n < FEW_INSTANCES)
        if rare:
            listed = ", ".join(f"{names.get(cid, cid)} ({n})" for n, cid in rare[:12])
            findings_more = f" and {len(rare) - 12} more" if len(rare) > 12 else ""
            source.findings.warning(
                "few-instances",
                f"{len(rare)} class(es) have fewer than {FEW_INSTANCES} instances: {listed}"
                f"{findings_more}. Their AP will be unreliable; add examples if they matter.",
                split=main,
            )
    if len(checked) > 1:
        present = {n: set(c) for n, c in counts.items()}
        only = {}
        for cid in set().union(*present.values()):
            where = [n for n, s in present.items() if cid in s]
            if len(where) == 1:
                only.setdefault(where[0], []).append(cid)
        for split_name, cids in sorted(only.items()):
            listed = ", ".join(str(names.get(c, c)) for c in sorted(cids)[:12])
            source.findings.warning(
                "single-split-class",
                f"{len(cids)} class(es) appear only in the '{split_name}' split: {listed}"
                f"{' ...' if len(cids) > 12 else ''}. They cannot be both learned and evaluated.",
                split=split_name,
            )
    return checked
