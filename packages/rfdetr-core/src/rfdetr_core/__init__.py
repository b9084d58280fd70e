"""rfdetr-core: the RF-DETR-Seg model for inference.

Importing the package registers ``torch.ops.rfdetr.ms_deform_attn`` (see :mod:`rfdetr_core.ops`), which the
model in :mod:`rfdetr_core.models` calls.
"""

from rfdetr_core import ops as _ops  # noqa: F401  (registers torch.ops.rfdetr.*)
from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import RFDETRError
from rfdetr_core.variants import Variant, get_variant, list_variants

__version__ = "0.1.0"

__all__ = [
    "RFDETR",
    "ClassMap",
    "Detections",
    "RFDETRError",
    "Variant",
    "__version__",
    "create_model",
    "get_variant",
    "list_variants",
]

# Imported on first use: the model and weight loaders are heavier than the registry.
_LAZY = {
    "RFDETR": "rfdetr_core.predict",
    "Detections": "rfdetr_core.detections",
    "create_model": "rfdetr_core.factory",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rfdetr_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
