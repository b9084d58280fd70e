"""The types every dataset reader fills: :class:`DatasetSource` (all splits behind one path) and
:class:`SplitSource` (one split as a COCO instance dict), and the split names (:func:`canonical_split`).

:mod:`rfdetr_train.data.sources` picks the layout of a path and :mod:`rfdetr_train.data.yolo_format` converts
YOLO folders; both produce these, and the checks, reports and loaders read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rfdetr_train.data.findings import FindingList

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"valid": "val", "validation": "val", "training": "train", "testing": "test"}


def canonical_split(name: str) -> str | None:
    """``"valid"`` -> ``"val"`` etc.; ``None`` for names that are no split (``"train2017"`` -> ``"train"``)."""
    low = name.lower()
    if low in SPLIT_NAMES:
        return low
    if low in _SPLIT_ALIASES:
        return _SPLIT_ALIASES[low]
    for prefix in ("train", "valid", "val", "test"):  # train2017, val2017, ...
        if low.startswith(prefix) and low[len(prefix) :].isdigit():
            return _SPLIT_ALIASES.get(prefix, prefix)
    return None


@dataclass
class SplitSource:
    """One split, as a COCO instance dict with the dataset's own image / category / annotation ids.

    ``coco["images"][i]["file_name"]`` is relative to ``image_root``. ``origin`` is the file the split came
    from (for messages). ``format`` is ``"coco"`` or ``"yolo"``.
    """

    name: str
    coco: dict
    image_root: Path
    origin: Path
    format: str = "coco"


@dataclass
class DatasetSource:
    """All splits found behind one path, and how they were found (``layout``)."""

    root: Path
    layout: str
    splits: dict[str, SplitSource] = field(default_factory=dict)
    findings: FindingList = field(default_factory=FindingList)
    notes: list[str] = field(default_factory=list)
