"""``rfdetr-train check PATH``: load a dataset the way training does and print its report.

Exit code 0 when there are no errors (warnings allowed), 1 otherwise. ``--json OUT.json`` also writes the
report as JSON; ``--skip-invalid`` reports what training with that flag would drop and exits 0 unless a
split cannot be read at all or the dataset has no masks.
"""

from __future__ import annotations

import argparse
import json
import sys

from rfdetr_core.atomic_io import atomic_write_text
from rfdetr_train.data.checks import check_dataset
from rfdetr_train.data.findings import UNSKIPPABLE, dropped_summary
from rfdetr_train.data.report import build_report, format_report
from rfdetr_train.data.sources import resolve_dataset


def run_check(args: argparse.Namespace) -> int:
    """Handler of ``rfdetr-train check`` (see :mod:`rfdetr_train.cli` for the flags)."""
    if args.path is None and not (args.train_ann or args.val_ann):
        from rfdetr_train.data.synthetic import synthetic_dataset_dir

        args.path = str(synthetic_dataset_dir())
    source = resolve_dataset(args.path, images=args.images, train_ann=args.train_ann, val_ann=args.val_ann)
    checked = check_dataset(source)
    report = build_report(source, checked)
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, default=str))
    errors = source.findings.errors
    if not errors:
        print("\nOK: no errors.")
        return 0
    unskippable = sorted({f.code for f in errors if f.code in UNSKIPPABLE})
    if args.skip_invalid and not unskippable:
        dropped = sum(f.dropped for f in errors)
        print(
            f"\n--skip-invalid: training would drop {dropped} annotation(s)/image(s) named above and go on."
        )
        summary = dropped_summary(source.findings)
        if summary:
            print(summary.replace("--skip-invalid dropped", "by reason:", 1))
        return 0
    if unskippable:
        hint = f"fix them (--skip-invalid cannot help with {', '.join(unskippable)})."
    else:
        hint = "fix them, or train with --skip-invalid to drop the bad annotations."
    print(f"\n{len(errors)} error(s): {hint}", file=sys.stderr)
    return 1
