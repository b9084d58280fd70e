"""The RF-DETR(-Seg) network. Importing ``rfdetr_core`` first registers ``torch.ops.rfdetr.ms_deform_attn``.

Only torch and the standard library are imported under ``models/``; :func:`rfdetr_core.factory.build_model`
maps a registered variant to a :class:`ModelSpec`.
"""

from rfdetr_core.models.detector import RFDETRModel
from rfdetr_core.models.spec import ModelSpec

__all__ = ["ModelSpec", "RFDETRModel"]
