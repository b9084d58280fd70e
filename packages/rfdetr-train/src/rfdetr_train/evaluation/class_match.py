"""Do a model's classes and a dataset's categories agree? (``rfdetr-train val`` refuses to score them if not.)

Both sides are :class:`~rfdetr_core.class_map.ClassMap` objects: the weights file's (its metadata, or
upstream's ``class_names``) and the dataset's categories. A model is scored per dataset category id, so they
disagree when an id of the dataset has another name in the model (names compared without case and outer
spaces) or is no class of the model at all. Extra model classes are fine (a COCO model on a COCO subset).
"""

from __future__ import annotations

from dataclasses import dataclass

from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import RFDETRError

SHOWN = 8  # mismatches listed by name in a message


class ClassMismatchError(RFDETRError):
    """A model evaluated on a dataset whose categories are other classes."""


@dataclass(frozen=True)
class ClassMismatch:
    """What differs: ``renamed`` (id, model name, dataset name); ``missing`` (id, dataset name) = dataset ids
    the model has no class for."""

    renamed: tuple[tuple[int, str, str], ...]
    missing: tuple[tuple[int, str], ...]

    def __bool__(self) -> bool:
        return bool(self.renamed or self.missing)

    def describe(self) -> str:
        """One sentence naming the first mismatching ids and names."""
        parts = [f"id {i} is {m!r} in the model but {d!r} in the dataset" for i, m, d in self.renamed[:SHOWN]]
        if len(self.renamed) > SHOWN:
            parts.append(f"{len(self.renamed) - SHOWN} more ids have other names")
        if self.missing:
            listed = ", ".join(f"{i} ({n!r})" for i, n in self.missing[:SHOWN])
            more = f" and {len(self.missing) - SHOWN} more" if len(self.missing) > SHOWN else ""
            parts.append(f"the model has no class for dataset id(s) {listed}{more}")
        return "; ".join(parts)


def _norm(name: str) -> str:
    return name.strip().casefold()


def compare_classes(model: ClassMap, dataset: ClassMap) -> ClassMismatch:
    """The differences between a model's class map and a dataset's (see the module doc)."""
    by_id = {e.category_id: e.name for e in model.entries}
    renamed, missing = [], []
    for e in sorted(dataset.entries, key=lambda e: e.category_id):
        if e.category_id not in by_id:
            missing.append((e.category_id, e.name))
        elif _norm(by_id[e.category_id]) != _norm(e.name):
            renamed.append((e.category_id, by_id[e.category_id], e.name))
    return ClassMismatch(tuple(renamed), tuple(missing))


def check_classes(model: ClassMap, dataset: ClassMap, weights: str, data: str, allow: bool) -> ClassMismatch:
    """Raise :class:`ClassMismatchError` naming the mismatches unless ``allow``; returns them either way."""
    mismatch = compare_classes(model, dataset)
    if mismatch and not allow:
        raise ClassMismatchError(
            f"{weights} was not trained on the classes of {data}: {mismatch.describe()}. Validate on the "
            "model's own dataset, or pass --allow-class-mismatch to score it anyway."
        )
    return mismatch
