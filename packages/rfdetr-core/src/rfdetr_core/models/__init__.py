"""The RF-DETR(-Seg) network. Importing ``rfdetr_core`` first registers ``torch.ops.rfdetr.ms_deform_attn``."""

from rfdetr_core.models.detector import RFDETRModel, build_model

__all__ = ["RFDETRModel", "build_model"]
