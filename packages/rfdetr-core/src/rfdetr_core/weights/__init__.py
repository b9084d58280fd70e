"""Weight files: reading any supported file safely, downloading official weights, converting upstream keys.

* :mod:`rfdetr_core.weights.files`    - :func:`read_weights_file` (ours, upstream ``.pth``/``.pt``, ``.ckpt``)
* :mod:`rfdetr_core.weights.download` - :func:`download_weights` (md5-checked, cached, licence-aware)
* :mod:`rfdetr_core.weights.upstream` - upstream state dict -> ours
* :mod:`rfdetr_core.weights.dinov2`   - DINOv2 backbone weights -> ours
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "WeightsFile": "files",
    "read_weights_file": "files",
    "load_pickle_safely": "files",
    "download_weights": "download",
    "resolve_official_name": "download",
    "DownloadError": "download",
    "LicenseNotAcceptedError": "download",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so importing one submodule does not import the others (and their optional pieces).
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
