"""The dataset report printed by ``rfdetr-train check``: counts, size statistics and findings."""

from __future__ import annotations

import statistics
from collections import Counter

from rfdetr_train.data.checks import CheckedSplit
from rfdetr_train.data.layout import DatasetSource

# COCO's area ranges (pixels of the mask at the source size).
SMALL_AREA = 32**2
MEDIUM_AREA = 96**2
_BIT_DEPTH = {
    "1": "1-bit",
    "L": "8-bit grey",
    "P": "8-bit palette",
    "RGB": "8-bit RGB",
    "RGBA": "8-bit RGBA",
    "LA": "8-bit grey+alpha",
    "CMYK": "8-bit CMYK",
    "YCbCr": "8-bit YCbCr",
    "I;16": "16-bit grey",
    "I;16B": "16-bit grey",
    "I;16L": "16-bit grey",
    "I": "32-bit int grey (16-bit PNG)",
    "F": "32-bit float grey",
}


def split_stats(checked: CheckedSplit) -> dict:
    """Counts of one checked split (JSON-able)."""
    coco = checked.coco
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns = [a for a in coco["annotations"] if not a.get("iscrowd", 0)]
    per_image = Counter(a["image_id"] for a in anns)
    counts = [per_image.get(im["id"], 0) for im in coco["images"]]
    per_class = Counter(names[a["category_id"]] for a in anns)
    areas = [checked.areas.get(a["id"], 0) for a in anns]
    n = max(len(areas), 1)
    sizes = Counter((im["width"], im["height"]) for im in coco["images"])
    modes = Counter(_BIT_DEPTH.get(f.mode, f.mode) for f in checked.files.values())
    return {
        "images": len(coco["images"]),
        "background_images": sum(1 for c in counts if c == 0),
        "instances": len(anns),
        "crowd_instances": len(coco["annotations"]) - len(anns),
        "categories": len(names),
        "instances_per_class": dict(per_class.most_common()),
        "instances_per_image": {
            "min": min(counts, default=0),
            "median": statistics.median(counts) if counts else 0,
            "mean": round(sum(counts) / max(len(counts), 1), 2),
            "max": max(counts, default=0),
        },
        "area_shares": {
            "small": round(sum(a < SMALL_AREA for a in areas) / n, 3),
            "medium": round(sum(SMALL_AREA <= a < MEDIUM_AREA for a in areas) / n, 3),
            "large": round(sum(a >= MEDIUM_AREA for a in areas) / n, 3),
        },
        "image_sizes": {
            "width": [min((w for w, _ in sizes), default=0), max((w for w, _ in sizes), default=0)],
            "height": [min((h for _, h in sizes), default=0), max((h for _, h in sizes), default=0)],
            "distinct": len(sizes),
            "most_common": [f"{w}x{h}" for (w, h), _ in sizes.most_common(3)],
        },
        "bit_depths": dict(modes),
        "dropped_images": checked.dropped_images,
        "dropped_annotations": checked.dropped_annotations,
        "clamped_annotations": checked.clamped_annotations,
        "origin": str(checked.source.origin),
        "format": checked.source.format,
    }


def build_report(source: DatasetSource, checked: dict[str, CheckedSplit]) -> dict:
    """The whole report as a JSON-able dict (``rfdetr-train check --json``)."""
    splits = {name: split_stats(c) for name, c in checked.items()}
    return {
        "path": str(source.root),
        "layout": source.layout,
        "splits_found": list(source.splits),
        "totals": {
            "images": sum(s["images"] for s in splits.values()),
            "instances": sum(s["instances"] for s in splits.values()),
        },
        "splits": splits,
        "notes": list(source.notes),
        "errors": [f.to_json() for f in source.findings.errors],
        "warnings": [f.to_json() for f in source.findings.warnings],
    }


def _fmt_share(d: dict) -> str:
    return " / ".join(f"{k} {100 * v:.1f}%" for k, v in d.items())


def format_report(report: dict, max_classes: int = 15, max_findings: int = 50) -> str:
    """Human-readable text of :func:`build_report`'s dict."""
    lines = [
        f"Dataset: {report['path']}",
        f"Layout:  {report['layout']}; splits found: {', '.join(report['splits_found']) or 'none'}",
        f"Total:   {report['totals']['images']} images, {report['totals']['instances']} instances",
    ]
    for name, s in report["splits"].items():
        ipi = s["instances_per_image"]
        sz = s["image_sizes"]
        lines += [
            "",
            f"[{name}] {s['origin']} ({s['format']})",
            f"  images {s['images']} ({s['background_images']} without objects), instances {s['instances']}"
            + (f" (+{s['crowd_instances']} crowd)" if s["crowd_instances"] else "")
            + f", categories {s['categories']}",
            f"  instances per image: min {ipi['min']}, median {ipi['median']}, mean {ipi['mean']}, "
            f"max {ipi['max']}",
            f"  object size (COCO areas): {_fmt_share(s['area_shares'])}",
            f"  image sizes: width {sz['width'][0]}-{sz['width'][1]}, height {sz['height'][0]}-{sz['height'][1]}"
            f", {sz['distinct']} distinct (most common {', '.join(sz['most_common'])})",
            "  bit depths: " + (", ".join(f"{k} {v}" for k, v in s["bit_depths"].items()) or "not read"),
        ]
        classes = list(s["instances_per_class"].items())
        shown = ", ".join(f"{k} {v}" for k, v in classes[:max_classes])
        more = f", ... ({len(classes) - max_classes} more)" if len(classes) > max_classes else ""
        lines.append(f"  instances per class: {shown}{more}")
        if s["dropped_images"] or s["dropped_annotations"]:
            lines.append(
                f"  dropped: {s['dropped_images']} image(s), {s['dropped_annotations']} annotation(s)"
            )
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    errors, warnings = report["errors"], report["warnings"]
    lines += ["", f"Findings: {len(errors)} error(s), {len(warnings)} warning(s)"]
    for f in (errors + warnings)[:max_findings]:
        where = f"[{f['split']}] " if f.get("split") else ""
        lines.append(f"  {f['level'].upper()} {f['code']}: {where}{f['message']}")
    if len(errors) + len(warnings) > max_findings:
        lines.append(f"  ... {len(errors) + len(warnings) - max_findings} more (see --json)")
    return "\n".join(lines)
