"""``rfdetr-export``: export a model to ONNX or TensorRT.

Not built yet: the command parses its flags and says so, exiting with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rfdetr-export", description="Export an RF-DETR-Seg model to ONNX or TensorRT."
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="checkpoint file or official variant name")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--onnx", action="store_true", help="export ONNX (default)")
    fmt.add_argument("--trt", action="store_true", help="build a TensorRT engine (needs TensorRT)")
    p.add_argument("--output", metavar="PATH", help="output file")
    p.add_argument("--dynamic-batch", action="store_true", help="export with a dynamic batch axis")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print(
        "rfdetr-export: exporting is not built yet in this version (0.1.0); ONNX and TensorRT export are planned.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
