"""Findings of the dataset checks: one record per problem, naming the file, the image or annotation id and
the fix. Errors stop training (unless ``--skip-invalid``); warnings are reported and training goes on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rfdetr_core.errors import RFDETRError

ERROR = "error"
WARNING = "warning"
# Error codes that --skip-invalid cannot help with: a split that cannot be read, or a dataset without masks
# (dropping every annotation would leave nothing to learn or to evaluate).
UNSKIPPABLE = frozenset({"json-parse", "json-unreadable", "missing-section", "no-masks"})


class DatasetError(RFDETRError):
    """A dataset that cannot be used as it is; the message lists the problems and the fixes."""

    def __init__(self, message: str, findings: list[Finding] | None = None):
        super().__init__(message)
        self.findings = list(findings or [])


@dataclass
class Finding:
    """One problem found in a dataset.

    ``code`` is a stable kebab-case key (e.g. ``"polygon-too-short"``) for tests and JSON reports;
    ``message`` is the full sentence for people. ``dropped`` counts the annotations (or images) that
    ``--skip-invalid`` removes because of it.
    """

    level: str
    code: str
    message: str
    file: str | None = None
    split: str | None = None
    image_id: int | str | None = None
    ann_id: int | str | None = None
    dropped: int = 0

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def format(self) -> str:
        where = f"[{self.split}] " if self.split else ""
        return f"{self.level.upper()} {where}{self.message}"


@dataclass
class FindingList:
    """Findings of one dataset, with helpers to count and format them."""

    items: list[Finding] = field(default_factory=list)

    def add(self, level: str, code: str, message: str, **where) -> Finding:
        f = Finding(level, code, message, **where)
        self.items.append(f)
        return f

    def error(self, code: str, message: str, **where) -> Finding:
        return self.add(ERROR, code, message, **where)

    def warning(self, code: str, message: str, **where) -> Finding:
        return self.add(WARNING, code, message, **where)

    def extend(self, other: FindingList | list[Finding]) -> None:
        self.items.extend(other.items if isinstance(other, FindingList) else other)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.items if f.level == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.items if f.level == WARNING]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def raise_for_errors(findings: FindingList, source: str, limit: int = 10) -> None:
    """Raise :class:`DatasetError` listing (up to ``limit``) errors, with the ways out: ``--skip-invalid``
    only where it can help (no error in :data:`UNSKIPPABLE`)."""
    errors = findings.errors
    if not errors:
        return
    lines = [f"  - {f.format()}" for f in errors[:limit]]
    more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
    way_out = (
        "; --skip-invalid cannot help with these"
        if any(f.code in UNSKIPPABLE for f in errors)
        else ", or pass --skip-invalid to drop the bad annotations and images"
    )
    raise DatasetError(
        f"The dataset at {source} has {len(errors)} error(s):\n" + "\n".join(lines) + more + "\n"
        f"Fix them (`rfdetr-train check {source}` prints the full report){way_out}.",
        errors,
    )


def dropped_summary(findings: FindingList, ids_shown: int = 3) -> str | None:
    """What ``--skip-invalid`` drops, by reason: ``--skip-invalid dropped 5 annotation(s)/image(s):
    3 polygon-too-short (ann 4, 9, 12), 2 image-missing (image 7, 8)``; ``None`` when nothing is dropped."""
    by_code: dict[str, list[Finding]] = {}
    for f in findings.errors:
        if f.dropped:
            by_code.setdefault(f.code, []).append(f)
    if not by_code:
        return None
    parts = []
    for code, items in sorted(by_code.items(), key=lambda kv: -sum(f.dropped for f in kv[1])):
        ids = [f"ann {f.ann_id}" if f.ann_id is not None else f"image {f.image_id}" for f in items]
        ids = [i for i in ids if not i.endswith(" None")]
        more = ", ..." if len(ids) > ids_shown else ""
        shown = f" ({', '.join(ids[:ids_shown])}{more})" if ids else ""
        parts.append(f"{sum(f.dropped for f in items)} {code}{shown}")
    total = sum(f.dropped for items in by_code.values() for f in items)
    return f"--skip-invalid dropped {total} annotation(s)/image(s): " + ", ".join(parts)
