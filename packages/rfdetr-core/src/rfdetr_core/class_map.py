"""The class map: logit slot (training id) <-> dataset category id <-> class name.

Our models have ``K = num_classes`` logit slots, slot = contiguous training id. Converted upstream COCO
weights keep their 91 slots, where slot = COCO category id (slot 0 and the 11 unused ids map to nothing).
The criterion and matcher work on slots; ``predict``, COCO results and the HTTP API report the dataset
category id and the name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rfdetr_core.errors import RFDETRError


@dataclass(frozen=True)
class ClassEntry:
    slot: int
    category_id: int
    name: str


class ClassMap:
    """Mapping between logit slots, dataset category ids and class names.

    Args:
        entries: one :class:`ClassEntry` per class; slots and category ids must be unique.
        num_slots: number of logit slots of the model head (``>= max(slot) + 1``); slots without an entry
            belong to no class.
    """

    def __init__(self, entries: Iterable[ClassEntry], num_slots: int | None = None):
        self.entries: tuple[ClassEntry, ...] = tuple(sorted(entries, key=lambda e: e.slot))
        slots = [e.slot for e in self.entries]
        cats = [e.category_id for e in self.entries]
        if len(set(slots)) != len(slots):
            raise RFDETRError(f"Class map has duplicate slots: {slots}")
        if len(set(cats)) != len(cats):
            dup = sorted({c for c in cats if cats.count(c) > 1})
            raise RFDETRError(f"Class map has duplicate category ids {dup}; each category needs one id.")
        if any(s < 0 for s in slots):
            raise RFDETRError("Class map slots must be >= 0.")
        need = max(slots) + 1 if slots else 0
        self.num_slots = need if num_slots is None else int(num_slots)
        if self.num_slots < need:
            raise RFDETRError(f"num_slots={num_slots} is smaller than the largest slot + 1 ({need}).")
        self._by_slot = {e.slot: e for e in self.entries}
        self._by_cat = {e.category_id: e for e in self.entries}

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_names(cls, names: Sequence[str], first_category_id: int = 0) -> ClassMap:
        """Contiguous classes: slot i = category id ``first_category_id + i``."""
        return cls(ClassEntry(i, first_category_id + i, str(n)) for i, n in enumerate(names))

    @classmethod
    def from_coco_categories(cls, categories: Iterable[Mapping]) -> ClassMap:
        """Contiguous training ids from COCO ``categories`` (sorted by id; 0-based, 1-based or sparse)."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(ClassEntry(i, int(c["id"]), str(c.get("name", c["id"]))) for i, c in enumerate(cats))

    @classmethod
    def identity(cls, categories: Iterable[Mapping], num_slots: int) -> ClassMap:
        """Slot = category id (upstream COCO weights: 91 slots, ids 1..90 with gaps)."""
        return cls((ClassEntry(int(c["id"]), int(c["id"]), str(c["name"])) for c in categories), num_slots)

    # -- lookups ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ClassMap)
            and self.entries == other.entries
            and self.num_slots == other.num_slots
        )

    def __repr__(self) -> str:
        return f"ClassMap({len(self.entries)} classes, {self.num_slots} slots)"

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def category_ids(self) -> list[int]:
        return [e.category_id for e in self.entries]

    def category_id(self, slot: int) -> int | None:
        """Dataset category id of ``slot`` (``None`` if the slot belongs to no class)."""
        e = self._by_slot.get(int(slot))
        return None if e is None else e.category_id

    def name(self, slot: int) -> str | None:
        e = self._by_slot.get(int(slot))
        return None if e is None else e.name

    def slot(self, category_id: int) -> int:
        """Slot of a dataset category id; an error naming the known ids otherwise."""
        e = self._by_cat.get(int(category_id))
        if e is None:
            raise RFDETRError(
                f"Category id {category_id} is not in the class map (known ids: {self.category_ids[:20]}"
                f"{' ...' if len(self.entries) > 20 else ''})."
            )
        return e.slot

    def slot_to_category_table(self) -> list[int]:
        """``table[slot]`` = category id, or -1 for slots without a class (for vectorised lookups)."""
        table = [-1] * self.num_slots
        for e in self.entries:
            table[e.slot] = e.category_id
        return table

    # -- serialisation ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "num_slots": self.num_slots,
            "classes": [{"slot": e.slot, "category_id": e.category_id, "name": e.name} for e in self.entries],
        }

    @classmethod
    def from_json(cls, data: Mapping) -> ClassMap:
        try:
            entries = [
                ClassEntry(int(c["slot"]), int(c["category_id"]), str(c["name"])) for c in data["classes"]
            ]
            return cls(entries, int(data["num_slots"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise RFDETRError(f"Malformed class map in checkpoint metadata: {exc!r}") from exc
