"""Train a model: the original project's entry point, kept so that its check command works as written.

    uv run python scripts/train.py --steps_per_validation 20 --test_limit 20

is the same command as ``python -m rfdetr_train --steps_per_validation 20 --test_limit 20``: the same flags
(kebab- or snake_case), subcommands, defaults (seg-tiny on the built-in synthetic dataset) and output, the
per-class tables included. Everything is handled by :func:`rfdetr_train.cli.main`.
"""

from __future__ import annotations

import sys

from rfdetr_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
