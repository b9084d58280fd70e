"""User-facing exceptions.

Every failure a user can cause (bad path, malformed file, wrong resolution, missing weights offline) raises
an :class:`RFDETRError` (or a subclass) whose message says what is wrong and how to fix it. Command-line
entry points catch these and print the message without a traceback (unless ``--debug``).
"""

from __future__ import annotations


class RFDETRError(Exception):
    """Base class of errors whose message is meant for the user."""


class InvalidResolutionError(RFDETRError, ValueError):
    """An input size that the model cannot take (not a multiple of patch size x windows)."""


class UnknownVariantError(RFDETRError, KeyError):
    """A variant name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(RFDETRError):
    """A weights or checkpoint file that cannot be read safely or does not fit the model."""


class ImageError(RFDETRError, ValueError):
    """An image input of an unsupported type, shape or bit depth."""


class MissingDependencyError(RFDETRError, ImportError):
    """An optional dependency is needed; the message names the extra to install."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``str(exc)``, stripped (``""`` when it says nothing): the cause of a library's
    multi-line error, for a one-line message."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def require(module: str, extra: str, package: str):
    """Import an optional dependency or raise an error naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"This feature needs the optional package '{module}'. Install it with "
            f"`pip install '{package}[{extra}]'` (or `pip install {module.split('.')[0]}`)."
        ) from exc
