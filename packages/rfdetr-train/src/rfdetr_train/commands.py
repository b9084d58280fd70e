"""Subcommand handlers of the rfdetr-train CLI (one function per subcommand, taking the parsed namespace).

Each handler converts flags into the typed config and calls the package API; it returns a process exit code.
"""

from __future__ import annotations

import argparse

from rfdetr_core.errors import RFDETRError


class NotBuiltYetError(RFDETRError):
    """A subcommand whose implementation has not landed yet."""


def run_train(args: argparse.Namespace) -> int:
    raise NotBuiltYetError("training is not built yet in this version of rfdetr-train.")


def run_val(args: argparse.Namespace) -> int:
    raise NotBuiltYetError("`val` is not built yet in this version of rfdetr-train.")


def run_check(args: argparse.Namespace) -> int:
    raise NotBuiltYetError("`check` is not built yet in this version of rfdetr-train.")


def run_eval(args: argparse.Namespace) -> int:
    raise NotBuiltYetError("`eval` is not built yet in this version of rfdetr-train.")
