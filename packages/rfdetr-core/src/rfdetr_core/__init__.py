"""rfdetr-core: the RF-DETR-Seg model for inference.

Importing the package registers ``torch.ops.rfdetr.ms_deform_attn`` (see :mod:`rfdetr_core.ops`), which the
model in :mod:`rfdetr_core.models` calls.
"""

from rfdetr_core import ops as _ops  # noqa: F401  (registers torch.ops.rfdetr.*)
from rfdetr_core.class_map import ClassMap
from rfdetr_core.errors import RFDETRError
from rfdetr_core.variants import Variant, get_variant, list_variants

__version__ = "0.1.0"

__all__ = ["ClassMap", "RFDETRError", "Variant", "__version__", "get_variant", "list_variants"]
