"""Where rfdetr-mask keeps its files.

``RFDETR_HOME`` (default ``~/.cache/rfdetr``) holds three sub-folders:

* ``weights/``    downloaded pretrained weights (md5-checked),
* ``datasets/``   generated datasets such as the built-in synthetic one,
* ``extensions/`` just-in-time builds of the CUDA deformable-attention kernel.

``RFDETR_WEIGHTS_URL`` overrides the base URL that official weights are downloaded from (``file://`` works).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path("~/.cache/rfdetr")


def rfdetr_home() -> Path:
    """The root folder (``$RFDETR_HOME`` or ``~/.cache/rfdetr``), not created."""
    return Path(os.environ.get("RFDETR_HOME", str(DEFAULT_HOME))).expanduser()


def _sub(name: str, create: bool) -> Path:
    path = rfdetr_home() / name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def weights_dir(create: bool = False) -> Path:
    """Folder of downloaded pretrained weights."""
    return _sub("weights", create)


def datasets_dir(create: bool = False) -> Path:
    """Folder of generated datasets."""
    return _sub("datasets", create)


def extensions_dir(create: bool = False) -> Path:
    """Folder of compiled CUDA extensions."""
    return _sub("extensions", create)


def weights_base_url(default: str) -> str:
    """Base URL for official weights: ``$RFDETR_WEIGHTS_URL`` if set, else ``default``."""
    return os.environ.get("RFDETR_WEIGHTS_URL", default).rstrip("/")
