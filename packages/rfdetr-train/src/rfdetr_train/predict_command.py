"""``rfdetr-train predict WEIGHTS IMAGES...``: detect and segment objects in image files.

Writes one drawn copy of every image (masks, boxes, labels) to ``--out`` and, with ``--json``, all
detections as one COCO results file (RLE masks; ``image_id`` is the file's numeric stem when it has one,
else its position in the list, and ``file_name`` names the image). Folders are searched for image files
(not recursively). Built on :class:`rfdetr_core.RFDETR`, so it takes every weights file core reads.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from rfdetr_core.atomic_io import atomic_write_text
from rfdetr_core.errors import ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def image_files(items: list[str]) -> list[Path]:
    """Expand ``items`` (image files and folders of them) into a sorted, de-duplicated file list."""
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image(p))
            if not found:
                raise ImageError(_empty_folder_message(path))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder.")
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def _empty_folder_message(path: Path) -> str:
    """Folders are not searched recursively: say so, and name the subfolders that do hold images."""
    message = f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder."
    holding = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        n = sum(1 for p in sub.rglob("*") if _is_image(p))
        if n:
            holding[sub] = n
    if holding:
        listed = ", ".join(f"{sub} ({n})" for sub, n in list(holding.items())[:4])
        message += f" Subfolders are not searched; these hold images: {listed}. Pass them instead."
    return message


def _image_ids(files: list[Path]) -> list[int]:
    """Numeric file stems when every stem is a distinct number (COCO-style names), else 1..N."""
    stems = [f.stem for f in files]
    if all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(files) + 1))


def _out_names(files: list[Path]) -> Iterator[str]:
    """``<stem>.jpg`` per image (``<stem>_2.jpg``, ... when two inputs share a stem)."""
    used: dict[str, int] = {}
    for f in files:
        n = used.get(f.stem, 0) + 1
        used[f.stem] = n
        yield f"{f.stem}.jpg" if n == 1 else f"{f.stem}_{n}.jpg"


def _summary(dets, limit: int = 5) -> str:
    if not len(dets):
        return "no detections"
    parts = [f"{name} {s:.2f}" for name, s in zip(dets.class_names[:limit], dets.scores[:limit].tolist())]
    more = f", +{len(dets) - limit} more" if len(dets) > limit else ""
    return f"{len(dets)} detection{'s' if len(dets) != 1 else ''} ({', '.join(parts)}{more})"


def run_predict(args: argparse.Namespace) -> int:
    from rfdetr_core import RFDETR

    files = image_files(args.images)
    model = RFDETR.from_checkpoint(args.weights, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"predicting {len(files)} image(s) with {model!r} (threshold {args.threshold:g})", flush=True)
    results: list[dict] = []
    names = _out_names(files)
    ids = _image_ids(files)
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        batch = model.predict([str(f) for f in chunk], threshold=args.threshold, batch_size=args.batch_size)
        for f, image_id, dets in zip(chunk, ids[start:], batch):
            line = f"{f}: {_summary(dets)}"
            if not args.no_draw:
                target = out / next(names)
                dets.plot(str(f)).save(target, quality=92)
                line += f" -> {target}"
            print(line, flush=True)
            for row in dets.to_coco(image_id=image_id):
                row["file_name"] = str(f)
                results.append(row)
    if args.json:
        target = out / "predictions.json"
        atomic_write_text(target, json.dumps(results))
        print(f"wrote {len(results)} detections of {len(files)} image(s) to {target} (COCO results)")
    return 0
