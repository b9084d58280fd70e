"""Find the dataset behind one path and read its splits as COCO instance dicts.

Layouts recognised by :func:`resolve_dataset` (first match wins):

1. explicit files: ``train_ann`` / ``val_ann`` / ``test_ann`` (+ ``images``), as the RF-DETR-MASK scripts had;
2. a COCO JSON file (images relative to the JSON's folder, or to ``images``);
3. a YOLO ``data.yaml`` file, or the ``names.txt`` of a YOLO folder;
4. a folder holding ``train.json`` / ``val.json`` / ``test.json`` (file names relative to that folder);
5. a Roboflow COCO export: ``train/``, ``valid/``, ``test/`` each with ``_annotations.coco.json``;
6. a folder with ``data.yaml`` / ``data.yml`` (YOLO, e.g. a Roboflow YOLO export);
7. a YOLO folder with ``images/``, ``labels/`` and ``names.txt``;
8. a folder with exactly one ``*.json`` (a single COCO file).

YOLO data are converted to COCO dicts in memory (see :mod:`rfdetr_train.data.yolo_format`), so everything
downstream (checks, datasets, evaluation ground truth) sees one format with the dataset's own ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from rfdetr_train.data import yolo_format
from rfdetr_train.data.findings import DatasetError, FindingList
from rfdetr_train.data.layout import SPLIT_NAMES, DatasetSource, SplitSource, canonical_split


def read_coco_json(path: Path, findings: FindingList, split: str | None = None) -> dict | None:
    """Parse a COCO JSON file; on a syntax error record it (with line and column) and return ``None``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        findings.error(
            "json-unreadable", f"{path}: cannot read the file ({exc}).", file=str(path), split=split
        )
        return None
    except UnicodeDecodeError as exc:
        findings.error(
            "json-parse",
            f"{path}: not UTF-8 text at byte {exc.start}; save the annotations as UTF-8 JSON.",
            file=str(path),
            split=split,
        )
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        findings.error(
            "json-parse",
            f"{path}:{exc.lineno}:{exc.colno}: JSON does not parse: {exc.msg} (character {exc.pos}). "
            "Fix the file or re-export it.",
            file=str(path),
            split=split,
        )
        return None
    if not isinstance(data, dict):
        findings.error(
            "missing-key",
            f"{path}: the top level is a {type(data).__name__}, not a COCO object with 'images', "
            "'annotations' and 'categories'.",
            file=str(path),
            split=split,
        )
        return None
    return data


def _coco_split(name: str, ann: Path, images: Path | None, out: DatasetSource) -> None:
    coco = read_coco_json(ann, out.findings, split=name)
    if coco is not None:
        out.splits[name] = SplitSource(name, coco, images or ann.parent, ann, "coco")


def _split_name_from_file(path: Path) -> str:
    stem = path.name.removesuffix(".json").removesuffix(".coco").removeprefix("_annotations")
    for part in (stem, path.parent.name, *stem.replace("-", "_").split("_")):
        if part and canonical_split(part):
            return canonical_split(part)
    return "train"


def resolve_dataset(
    path: str | Path | None = None,
    *,
    images: str | Path | None = None,
    train_ann: str | Path | None = None,
    val_ann: str | Path | None = None,
    test_ann: str | Path | None = None,
) -> DatasetSource:
    """Detect the layout behind ``path`` (see the module docstring) and read every split found.

    JSON syntax errors become ``json-parse`` findings (the split is then missing); a path that matches no
    layout raises :class:`DatasetError` saying what was looked for.
    """
    img_root = Path(images).expanduser() if images else None
    if img_root is not None and not img_root.is_dir():
        raise DatasetError(f"--images {img_root}: no such folder.")
    explicit = {"train": train_ann, "val": val_ann, "test": test_ann}
    if any(explicit.values()):
        root = Path(path).expanduser() if path else Path(next(v for v in explicit.values() if v)).parent
        out = DatasetSource(root, "explicit COCO files")
        for name, ann in explicit.items():
            if ann:
                ann = Path(ann).expanduser()
                if not ann.is_file():
                    raise DatasetError(f"--{name}-ann {ann}: no such file.")
                _coco_split(name, ann, img_root, out)
        return out
    if path is None:
        raise DatasetError("No dataset given: pass a path (or --train-ann/--val-ann).")
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder. Pass a COCO JSON, a dataset folder or a data.yaml.")
    if p.is_file():
        if p.suffix.lower() == ".json":
            out = DatasetSource(p.parent, "COCO JSON file")
            _coco_split(_split_name_from_file(p), p, img_root, out)
            return out
        if p.suffix.lower() in (".yaml", ".yml"):
            return yolo_format.read_data_yaml(p)
        if p.name == "names.txt":
            return yolo_format.read_yolo_folder(p.parent)
        raise DatasetError(
            f"{p}: not a dataset file. Pass a COCO .json, a YOLO data.yaml, names.txt or a dataset folder."
        )
    split_files = {n: p / f"{n}.json" for n in SPLIT_NAMES if (p / f"{n}.json").is_file()}
    if not split_files and (p / "valid.json").is_file():
        split_files["val"] = p / "valid.json"
    if split_files:
        out = DatasetSource(p, "folder of split JSON files")
        for name, ann in split_files.items():
            _coco_split(name, ann, img_root, out)
        if (p / "images").is_dir() and (p / "labels").is_dir():
            out.notes.append(
                f"{p} also holds a YOLO layout (images/, labels/); pass {p / 'names.txt'} to use it."
            )
        return out
    rf = {}
    for sub in sorted(q for q in p.iterdir() if q.is_dir()):
        name = canonical_split(sub.name)
        if name and (sub / "_annotations.coco.json").is_file():
            rf[name] = sub / "_annotations.coco.json"
    if rf:
        out = DatasetSource(p, "Roboflow COCO export")
        for name, ann in rf.items():
            _coco_split(name, ann, img_root, out)
        return out
    for yaml_name in ("data.yaml", "data.yml"):
        if (p / yaml_name).is_file():
            return yolo_format.read_data_yaml(p / yaml_name)
    if (p / "images").is_dir() and (p / "labels").is_dir():
        return yolo_format.read_yolo_folder(p)
    jsons = sorted(p.glob("*.json"))
    if len(jsons) == 1:
        out = DatasetSource(p, "COCO JSON file")
        _coco_split(_split_name_from_file(jsons[0]), jsons[0], img_root, out)
        return out
    raise DatasetError(
        f"{p}: no dataset layout recognised. Expected one of: train.json/val.json/test.json; "
        "train/ valid/ test/ with _annotations.coco.json (Roboflow); data.yaml (YOLO); images/ + labels/ + "
        "names.txt (YOLO); or a single COCO .json file"
        + (f" (found {len(jsons)} .json files: pass one of them)" if jsons else "")
        + "."
    )
