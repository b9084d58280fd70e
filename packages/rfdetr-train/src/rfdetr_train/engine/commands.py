"""Handlers of the ``train`` and ``val`` subcommands (looked up lazily by :mod:`rfdetr_train.cli`)."""

from __future__ import annotations

import argparse

# Parser entries that are not options of the run.
_NOT_OPTIONS = {"command", "debug", "config", "split", "path", "json"}


def _options(args: argparse.Namespace) -> dict:
    opts = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    # flags default to False in argparse: leave them to the config file / defaults unless given
    for flag in ("skip_invalid", "wandb"):
        if opts.get(flag) is False:
            opts.pop(flag)
    return opts


def run_train(args: argparse.Namespace) -> int:
    """``rfdetr-train [train] ...``: 0 when training completed or stopped early, 130 when interrupted."""
    from rfdetr_train.engine.api import train

    result = train(config=args.config, **_options(args))
    if result.stopped.startswith("signal"):
        return 130
    return 0


def run_val(args: argparse.Namespace) -> int:
    """``rfdetr-train val --weights PATH [--data PATH] [--split val|test]``."""
    from rfdetr_train.engine.evaluate_weights import val

    opts = _options(args)
    val(split=args.split, **opts)
    return 0
