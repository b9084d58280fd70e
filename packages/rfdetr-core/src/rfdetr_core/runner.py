"""The runner seam: what the ``RFDETR`` facade runs a normalised batch through.

A *runner* maps images ``[B, 3, H, W]`` float32 (normalised, ``(H, W) = runner.card.resolution``) to the
:class:`~rfdetr_core.deploy.DeployModel` ``postprocess=True`` tuple: ``scores [B, K]``, ``labels [B, K]``
(dataset category ids, ``-1`` = slot without class), ``boxes [B, K, 4]`` (xyxy normalised) and, for
segmentation models, ``masks [B, K, h, w]`` (mask logits). It has ``.card`` (the
:class:`~rfdetr_core.model_card.ModelCard`), ``.device`` (where its outputs live) and ``.backend`` (a name:
``"pytorch"``, ``"onnxruntime"``, ``"tensorrt"``). ``predict``, ``Detections``, drawing and ``to_coco`` work the
same over any runner: the host half of post-processing (:func:`rfdetr_core.postprocess.finish_detections`)
runs after it.

Runners for exported files come from other packages through the entry-point group ``rfdetr_core.runners``:
an entry named after a file suffix without the dot (``onnx``, ``engine``, ``pt2``) pointing to a callable
``(path, *, device=None, **options) -> Runner``. rfdetr-export registers ``onnx``, ``engine`` and ``pt2``
(AOTInductor packages); core never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rfdetr_core.deploy import DeployModel, check_input
from rfdetr_core.errors import CheckpointError, MissingDependencyError
from rfdetr_core.model_card import ModelCard

ENTRY_POINT_GROUP = "rfdetr_core.runners"
# Where the runner of a suffix comes from, for the error when none is installed.
_PROVIDERS = {".onnx": "rfdetr-export[onnx]", ".engine": "rfdetr-export[trt]", ".pt2": "rfdetr-export"}


@runtime_checkable
class Runner(Protocol):
    """See the module docstring."""

    card: ModelCard
    device: torch.device
    backend: str

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]: ...


class TorchRunner:
    """The PyTorch runner: a :class:`~rfdetr_core.deploy.DeployModel` in eager mode.

    Args:
        model: an ``RFDETRModel`` already on its device and dtype (eval mode).
        card: its model card.
        num_select: ``K`` (default ``card.default_num_select``).

    The network runs in the model's dtype; the graph-safe selection runs on float32 outputs (low-precision
    sigmoid would reorder near-equal scores: ``DeployModel(selection_dtype=torch.float32)``), the same function
    the exported graphs end in.
    """

    backend = "pytorch"

    def __init__(self, model: nn.Module, card: ModelCard, num_select: int | None = None) -> None:
        self.model = model
        self.card = card
        self.deploy = DeployModel(model, card, num_select=num_select, selection_dtype=torch.float32)
        self.num_select = self.deploy.num_select
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def with_num_select(self, num_select: int) -> TorchRunner:
        """A runner over the same model keeping ``num_select`` pairs."""
        return TorchRunner(self.model, self.card, num_select)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        """``images [B, 3, H, W]`` float normalised -> ``(scores, labels, boxes[, masks])`` (module docstring)."""
        check_input(images, self.card)
        return self.deploy(images.to(device=self.device, dtype=self.dtype))


def runner_from_file(
    path: str | os.PathLike, *, device: str | torch.device | None = None, **options
) -> Runner:
    """The runner registered for ``path``'s suffix in the ``rfdetr_core.runners`` entry-point group.

    Raises :class:`~rfdetr_core.errors.CheckpointError` for a folder (naming the weights file to pass, e.g. a
    run folder's ``best.safetensors``) or a missing file, and
    :class:`~rfdetr_core.errors.MissingDependencyError` naming the package to install when no runner is
    registered for the suffix.
    """
    from importlib.metadata import entry_points

    from rfdetr_core.weights.files import folder_message

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_message(path))
    if not path.exists():
        raise CheckpointError(f"Model file not found: {path}")
    suffix = path.suffix.lower()
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == suffix.lstrip(".")]
    if not found:
        provider = _PROVIDERS.get(suffix)
        hint = f"pip install {provider}" if provider else "install the package that provides it"
        raise MissingDependencyError(
            f"No runner for {suffix or 'suffix-less'} files like {path.name}: {hint} (runners register in the "
            f"'{ENTRY_POINT_GROUP}' entry-point group). PyTorch weights (.safetensors, .pth, .pt, .ckpt) load "
            "with RFDETR.from_checkpoint."
        )
    return found[0].load()(path, device=device, **options)
