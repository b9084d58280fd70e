"""``rfdetr-train strip IN OUT``: an inference-only copy of a weights file (DETR group 0 only).

Training writes every DETR group (fine-tuning needs them); inference runs group 0 alone. The stripped file
keeps the model card and the training record and loads everywhere the full one does
(:func:`rfdetr_core.checkpoint.strip_checkpoint`). Prints both sizes.
"""

from __future__ import annotations

import argparse

from rfdetr_core.checkpoint import strip_checkpoint


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run_strip(args: argparse.Namespace) -> int:
    """Handler of ``rfdetr-train strip`` (see :mod:`rfdetr_train.cli` for the flags)."""
    before, after = strip_checkpoint(args.input, args.output)
    print(
        f"{args.input}: {_mb(before)} -> {args.output}: {_mb(after)} "
        f"({100 * (1 - after / before):.1f}% smaller; DETR group 0 only, for inference)"
    )
    return 0
