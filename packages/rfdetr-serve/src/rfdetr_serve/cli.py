"""``rfdetr-serve MODEL``: serve a model over HTTP (``POST /predict``).

Not built yet: the command parses its flags and says so, exiting with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rfdetr-serve", description="Serve an RF-DETR-Seg model over HTTP.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="checkpoint, exported model or variant name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("rfdetr-serve: the HTTP server is not built yet in this version (0.1.0).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
