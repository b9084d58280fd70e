"""YOLO-seg datasets, converted to COCO instance dicts in memory.

A label file holds one object per line: ``class x1 y1 x2 y2 ...`` with coordinates normalised to [0, 1]
(``class cx cy w h``, a box-only line, becomes a rectangle with a warning). The label of
``.../images/<rel>.jpg`` is ``.../labels/<rel>.txt``; an image without a label file is a background image.
Label files without an image are a warning and are not counted; ``*.cache`` files are ignored.

Ids of the resulting COCO dicts: category id = YOLO class index, image ids 1..N in sorted path order,
annotation ids 1..M; every annotation records its ``source`` (``file:line``) for messages.
"""

from __future__ import annotations

from pathlib import Path

from rfdetr_train.data.findings import DatasetError, FindingList
from rfdetr_train.data.layout import DatasetSource, SplitSource, canonical_split

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _read_names_txt(path: Path) -> list[str]:
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DatasetError(f"{path}: no class names; write one class name per line.")
    return names


def _names_from_yaml(value, path: Path) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        try:
            ids = sorted(int(k) for k in value)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: 'names' keys must be class indices 0..N-1.") from exc
        if ids != list(range(len(ids))):
            raise DatasetError(
                f"{path}: 'names' must cover the class indices 0..{len(ids) - 1} without gaps."
            )
        return [str(value.get(i, value.get(str(i)))) for i in ids]
    raise DatasetError(f"{path}: 'names' must be a list or a mapping index -> name.")


def _label_path(image: Path) -> Path:
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):  # the last "images" folder on the path
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_yolo_folder(root: Path) -> DatasetSource:
    """A folder with ``images/``, ``labels/`` and ``names.txt`` (or ``data.yaml``).

    Sub-folders of ``images/`` named like splits (``train``, ``val``/``valid``, ``test``, ``train2017``...)
    become splits; images directly in ``images/`` or in other sub-folders form the ``train`` split.
    """
    names_file = root / "names.txt"
    if not names_file.is_file():
        for y in ("data.yaml", "data.yml"):
            if (root / y).is_file():
                return read_data_yaml(root / y)
        raise DatasetError(f"{root}: YOLO folder without names.txt; write the class names there, one a line.")
    names = _read_names_txt(names_file)
    images_dir = root / "images"
    groups: dict[str, list[Path]] = {}
    for p in _list_images(images_dir):
        rel = p.relative_to(images_dir)
        split = canonical_split(rel.parts[0]) if len(rel.parts) > 1 else None
        groups.setdefault(split or "train", []).append(p)
    out = DatasetSource(root, "YOLO folder (images/, labels/, names.txt)")
    used_labels: set[Path] = set()
    for split, imgs in groups.items():
        out.splits[split] = _convert(split, imgs, names, root, names_file, out.findings, used_labels)
    _warn_orphan_labels(root / "labels", used_labels, out.findings)
    return out


def read_data_yaml(path: Path) -> DatasetSource:
    """An Ultralytics ``data.yaml``: ``path`` (optional), ``train`` / ``val`` / ``test`` (folders or .txt
    lists of images), ``names`` (list or index -> name mapping)."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: YAML does not parse: {exc}") from exc
    if not isinstance(cfg, dict) or "names" not in cfg:
        raise DatasetError(
            f"{path}: a YOLO data.yaml needs 'names' (the class names) and 'train'/'val' entries."
        )
    names = _names_from_yaml(cfg["names"], path)
    if "nc" in cfg and int(cfg["nc"]) != len(names):
        raise DatasetError(f"{path}: nc={cfg['nc']} but {len(names)} names are listed; make them agree.")
    base = path.parent
    if cfg.get("path"):
        base = (path.parent / str(cfg["path"])).resolve()
    out = DatasetSource(path.parent, "YOLO data.yaml")
    used_labels: set[Path] = set()
    label_dirs: set[Path] = set()
    for key in ("train", "val", "valid", "test"):
        if not cfg.get(key):
            continue
        split = canonical_split(key)
        entries = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
        imgs: list[Path] = []
        for entry in entries:
            where = _resolve_entry(str(entry), base, path.parent)
            if where is None:
                raise DatasetError(
                    f"{path}: {key}: {entry} not found (looked under {base} and {path.parent})."
                )
            if where.is_file():  # a .txt list of image paths
                lines = [ln.strip() for ln in where.read_text(encoding="utf-8").splitlines() if ln.strip()]
                imgs += [
                    (where.parent / ln).resolve() if not Path(ln).is_absolute() else Path(ln) for ln in lines
                ]
            else:
                imgs += _list_images(where)
        for im in imgs:
            label_dirs.add(_label_path(im).parent)
        out.splits[split] = _convert(split, sorted(set(imgs)), names, base, path, out.findings, used_labels)
    if not out.splits:
        raise DatasetError(f"{path}: no 'train', 'val' or 'test' entry.")
    for d in sorted(label_dirs):
        _warn_orphan_labels(d, used_labels, out.findings, recursive=False)
    return out


def _resolve_entry(entry: str, base: Path, yaml_dir: Path) -> Path | None:
    candidates = [base / entry, yaml_dir / entry]
    stripped = entry
    while stripped.startswith("../"):  # Roboflow exports write ../train/images beside data.yaml
        stripped = stripped[3:]
    candidates.append(yaml_dir / stripped)
    for c in candidates:
        if c.exists():
            return c.resolve()
    return None


def _warn_orphan_labels(folder: Path, used: set[Path], findings: FindingList, recursive: bool = True) -> None:
    if not folder.is_dir():
        return
    files = folder.rglob("*.txt") if recursive else folder.glob("*.txt")
    for f in sorted(files):
        if f.resolve() not in used:
            n = sum(1 for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip())
            findings.warning(
                "yolo-label-without-image",
                f"{f}: label file without an image ({n} object(s) not counted). Add the image or delete "
                "the label file.",
                file=str(f),
            )


def _convert(
    split: str,
    images: list[Path],
    names: list[str],
    root: Path,
    origin: Path,
    findings: FindingList,
    used_labels: set[Path],
) -> SplitSource:
    from PIL import Image

    coco: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
    }
    box_only = 0
    for img_path in images:
        image_id = len(coco["images"]) + 1
        try:
            rel = str(img_path.relative_to(root))
        except ValueError:
            rel = str(img_path)
        try:
            with Image.open(img_path) as im:
                w, h = im.size
        except OSError as exc:
            findings.error(
                "image-unreadable",
                f"{img_path}: cannot read the image ({exc}); replace or delete it (and its label file).",
                file=str(img_path),
                split=split,
                image_id=image_id,
                dropped=1,
            )
            continue
        coco["images"].append({"id": image_id, "file_name": rel, "width": w, "height": h})
        label = _label_path(img_path)
        if not label.is_file():
            continue  # background image
        used_labels.add(label.resolve())
        for lineno, line in enumerate(label.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            src = f"{label}:{lineno}"
            try:
                values = [float(v) for v in line.split()]
            except ValueError:
                findings.error(
                    "yolo-bad-line",
                    f"{src}: not numbers ({line.strip()[:40]!r}); each line is 'class x1 y1 x2 y2 ...'.",
                    file=str(label), split=split, image_id=image_id, dropped=1,
                )  # fmt: skip
                continue
            cls = values[0]
            if cls != int(cls) or not 0 <= int(cls) < len(names):
                findings.error(
                    "yolo-class-range",
                    f"{src}: class {values[0]:g} is out of range; names list {len(names)} classes "
                    f"(0..{len(names) - 1}). Fix the label or add the class name.",
                    file=str(label), split=split, image_id=image_id, dropped=1,
                )  # fmt: skip
                continue
            coords = values[1:]
            if len(coords) == 4:  # cx cy w h: a detection label, its mask is the box
                box_only += 1
                cx, cy, bw, bh = coords
                coords = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2,
                          cx - bw / 2, cy + bh / 2]  # fmt: skip
            if len(coords) < 6 or len(coords) % 2:
                findings.error(
                    "polygon-too-short",
                    f"{src}: a polygon needs at least 3 points (x y pairs), got {len(coords)} numbers. "
                    "Fix or delete the line.",
                    file=str(label), split=split, image_id=image_id, dropped=1,
                )  # fmt: skip
                continue
            poly = [c * (w if i % 2 == 0 else h) for i, c in enumerate(coords)]
            xs, ys = poly[0::2], poly[1::2]
            # shoelace area of the polygon (pixels), which COCO evaluation uses for its area ranges
            area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
            x0, y0 = min(xs), min(ys)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(cls),
                    "segmentation": [poly],
                    "area": area,
                    "bbox": [x0, y0, max(xs) - x0, max(ys) - y0],
                    "iscrowd": 0,
                    "source": src,
                }
            )
    if box_only:
        findings.warning(
            "yolo-box-only",
            f"{origin} [{split}]: {box_only} label line(s) hold a box only (class cx cy w h); their mask is "
            "the box. Use YOLO-seg polygons for real masks.",
            file=str(origin),
            split=split,
        )
    return SplitSource(split, coco, root, origin, "yolo")
