"""The deploy model: a traceable inference module (torch.export, ONNX, TensorRT) for one model card.

::

    deploy = DeployModel(model, card)                       # postprocess=True, K = card.default_num_select
    scores, labels, boxes, masks = deploy(images)           # images [B, 3, H, W] normalised, (H, W) = card.resolution
    torch.export.export(deploy, (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))

Compared with ``RFDETRModel`` in eval mode:

* only group 0 is kept: the query tables hold ``Q`` rows and the two-stage heads one group (training's other
  groups are never run at inference); the other modules are shared with ``model``, not copied;
* the backbone's position table is resized once, here, for ``card.resolution`` and stored as a buffer, so no
  antialiased bicubic resize (which ONNX cannot express) runs in the traced graph;
* the output is a tuple, and ``forward`` checks nothing in Python: callers check the input at their boundary
  (:func:`check_input`; ``RFDETR.predict`` and the export CLI do);
* with ``postprocess=True`` the graph ends in the graph-safe half of post-processing
  (:func:`rfdetr_core.postprocess.select_detections`).

Outputs (names in :attr:`DeployModel.output_names`):

* ``postprocess=True``: ``scores [B, K]`` float32, ``labels [B, K]`` int64 dataset category ids (``-1``: slot
  without class), ``boxes [B, K, 4]`` xyxy normalised to ``[0, 1]``, ``masks [B, K, h, w]`` mask logits
  (segmentation models only), ``K = num_select``;
* ``postprocess=False``: ``pred_logits [B, Q, S]``, ``pred_boxes [B, Q, 4]`` normalised cxcywh, ``pred_masks
  [B, Q, h, w]`` (the eval output dict's tensors).

The deformable-attention backend is whatever ``torch.ops.rfdetr.ms_deform_attn`` picks when traced; export on
a CUDA machine should pick the PyTorch path explicitly (``rfdetr_core.ops``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from rfdetr_core.errors import InvalidResolutionError
from rfdetr_core.model_card import ModelCard
from rfdetr_core.postprocess import select_detections

RAW_OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks")
DETECTION_OUTPUTS = ("scores", "labels", "boxes", "masks")

# Upper bound of the symbolic batch axis of every graph exported with a dynamic batch (ONNX, AOTInductor):
# torch.export's range analysis needs one, and the graph is valid for batches up to it.
MAX_DYNAMIC_BATCH = 4096


def _group0_view(model: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` whose DETR group tables hold group 0 only; all other modules are shared.

    ``query_feat``/``refpoint_embed`` keep their first ``Q`` rows (views of the same storage) and the two-stage
    ``query_selection`` lists keep entry 0, so ``model``'s own eval forward (which reads those) runs unchanged.
    """
    q = int(model.num_queries)
    view = copy.copy(model)
    view._modules = dict(model._modules)  # new registries: assigning below must not touch the original
    view._parameters = dict(model._parameters)
    view._buffers = dict(model._buffers)
    for name in ("query_feat", "refpoint_embed"):
        table = getattr(model, name)
        view._modules[name] = nn.Embedding.from_pretrained(table.weight[:q].detach(), freeze=True)
    qs = copy.copy(model.query_selection)
    qs._modules = dict(model.query_selection._modules)
    for name in ("proj", "norm", "class_embed", "bbox_embed"):
        qs._modules[name] = nn.ModuleList([getattr(model.query_selection, name)[0]])
    view._modules["query_selection"] = qs
    view.group_detr = 1
    return view.eval()


def check_input(images: Tensor, card: ModelCard) -> None:
    """The boundary check of a deploy model's input: ``[B, 3, H, W]`` float with ``(H, W) = card.resolution``.

    Raises :class:`~rfdetr_core.errors.InvalidResolutionError` (a ``ValueError``) saying what to do.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidResolutionError(
            f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}; preprocess them first "
            "(rfdetr_core.preprocess.preprocess)"
        )
    if not images.is_floating_point():
        raise InvalidResolutionError(f"expected float images (normalised), got {images.dtype}")
    got = (int(images.shape[-2]), int(images.shape[-1]))
    if got != card.resolution:
        raise InvalidResolutionError(
            f"this deploy model runs at {card.resolution[0]}x{card.resolution[1]} (H x W), got {got[0]}x{got[1]}; "
            "resize the images (rfdetr_core.preprocess.preprocess does) or build it for another resolution"
        )


class DeployModel(nn.Module):
    """``RFDETRModel`` for inference at ``card.resolution``, tuple outputs, traceable (module docstring).

    Args:
        model: an ``RFDETRModel`` (put in eval mode; its modules are shared, not copied).
        card: the model card (resolution, class map for the label table, default ``num_select``).
        postprocess: end the graph in the graph-safe half of post-processing (default) or return raw outputs.
        num_select: ``K`` for ``postprocess=True`` (default ``card.default_num_select``; capped at ``Q*S``).
        selection_dtype: with ``postprocess=True``, the dtype the selection runs in (sigmoid, top-K, boxes and
            the picked mask logits are cast to it); ``None`` (default): the network's. The GPU fast path
            (``RFDETR.optimize``) runs a bf16/fp16 network and selects in float32, as eager predict does, so
            that low-precision scores do not reorder or threshold detections differently.
    """

    def __init__(
        self,
        model: nn.Module,
        card: ModelCard,
        *,
        postprocess: bool = True,
        num_select: int | None = None,
        selection_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if int(model.num_slots) != card.num_slots or int(model.num_queries) != card.num_queries:
            raise ValueError(
                f"the card ({card.num_queries} queries, {card.num_slots} slots) does not describe this model "
                f"({model.num_queries} queries, {model.num_slots} slots)"
            )
        model.eval()
        self.card = card
        self.postprocess = bool(postprocess)
        k = card.default_num_select if num_select is None else int(num_select)
        if k < 1:
            raise ValueError(f"num_select must be >= 1, got {k}")
        self.num_select = min(k, card.num_queries * card.num_slots)
        if selection_dtype is not None and not selection_dtype.is_floating_point:
            raise ValueError(f"selection_dtype must be a floating dtype, got {selection_dtype}")
        self.selection_dtype = selection_dtype
        self.net = _group0_view(model)
        patch = int(model.backbone.patch_size)
        grid = (card.resolution[0] // patch, card.resolution[1] // patch)
        with torch.no_grad():
            table = model.backbone.position_table(grid).detach().clone()  # [1, 1 + Hp*Wp, C]
        self.register_buffer("pos_table", table)
        # on the model's device like the position table: a CUDA graph cannot capture a host-to-device copy
        slot_category = torch.tensor(
            card.class_map.slot_to_category_table(), dtype=torch.int64, device=table.device
        )
        self.register_buffer("slot_category", slot_category)  # [S], -1 = slot without class
        self.is_segmentation = bool(model.is_segmentation)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of :meth:`forward`'s outputs, in order (``masks``/``pred_masks`` only for segmentation)."""
        names = DETECTION_OUTPUTS if self.postprocess else RAW_OUTPUTS
        return names if self.is_segmentation else names[:-1]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """``images [B, 3, H, W]`` normalised, ``(H, W) = card.resolution`` (not checked here: see
        :func:`check_input`) -> the tuple named by :attr:`output_names` (shapes in the module docstring)."""
        raw = self.network_outputs(images)
        return self.select(*raw) if self.postprocess else raw

    def network_outputs(self, images: Tensor) -> tuple[Tensor, ...]:
        """The network alone: ``images [B, 3, H, W]`` -> ``(pred_logits [B, Q, S], pred_boxes [B, Q, 4])`` and,
        for segmentation, ``pred_masks [B, Q, h, w]``, in the network's dtype."""
        logits, boxes, masks = self.net.forward_deploy(images, self.pos_table.to(images.dtype), check=False)
        return (logits, boxes) if masks is None else (logits, boxes, masks)

    def select(self, logits: Tensor, boxes: Tensor, masks: Tensor | None = None) -> tuple[Tensor, ...]:
        """The graph-safe selection of :meth:`network_outputs`' tensors in ``selection_dtype`` -> ``(scores,
        labels, boxes, masks)`` (``masks`` only for segmentation; shapes in the module docstring)."""
        if self.selection_dtype is not None:
            # masks are cast after the gather (the same values; only K of the Q maps are copied)
            logits, boxes = logits.to(self.selection_dtype), boxes.to(self.selection_dtype)
        scores, labels, picked, picked_masks = select_detections(
            logits, boxes, masks, self.slot_category, self.num_select
        )
        if self.selection_dtype is not None and picked_masks is not None:
            picked_masks = picked_masks.to(self.selection_dtype)
        return (scores, labels, picked) if picked_masks is None else (scores, labels, picked, picked_masks)
