"""From a loaded model to the module that is exported, and the export + check steps the CLI runs.

The module is core's :class:`rfdetr_core.deploy.DeployModel` (group 0, position table baked for the card's
resolution, graph-safe post-processing). For ``--half`` the network part runs in fp16 and the
post-processing (sigmoid, top-k, box conversion) in float32 on its float32-cast outputs: selecting the top
``K`` among fp16 scores would reorder near-ties that PyTorch's float32 path keeps apart.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from rfdetr_export.onnx_export import ExportError, OnnxExportResult, export_onnx


class Float32Island(nn.Module):
    """Run ``module`` in float32 inside an fp16 network: floating tensor arguments are cast to float32 and
    floating tensor results back to fp16."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    def forward(self, *args, **kwargs):
        cast = lambda v, dtype: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        out = self.module(
            *(cast(a, torch.float32) for a in args), **{k: cast(v, torch.float32) for k, v in kwargs.items()}
        )
        if isinstance(out, tuple):
            return tuple(cast(o, torch.float16) for o in out)
        return cast(out, torch.float16)


class HalfDeploy(nn.Module):
    """fp16 network, float32 boundary: ``images [B,3,H,W]`` f32 -> the deploy tuple in float32.

    ``deploy`` is a copy of the caller's ``DeployModel`` converted to fp16 (the caller's stays float32); its
    graph-safe post-processing, when it has one, runs in float32 (built with ``selection_dtype=torch.float32``).
    The two-stage query selection (proposal scores and their top-``Q``) runs in float32 too: in fp16 near-equal
    proposal scores swap places and whole queries change (measured on seg-tiny: proposal boxes off by 0.3 of
    the image in fp16, decoder outputs within 0.01 once fed the same proposals).
    """

    def __init__(self, deploy: nn.Module) -> None:
        super().__init__()
        self.deploy = copy.deepcopy(deploy).half().eval()  # int64 buffers (the label table) stay int64
        net = self.deploy.net
        net._modules["query_selection"] = Float32Island(net.query_selection)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(o.float() if o.is_floating_point() else o for o in self.deploy(images.half()))


def deploy_for(loaded, *, raw: bool, num_select: int | None, half: bool = False):
    """``(module to export, reference float32 DeployModel, card, output names)`` for a ``LoadedModel``.

    ``num_select`` (``--num-select``) is recorded in the card so runtimes know ``K``.
    """
    from rfdetr_core.deploy import DeployModel

    card = loaded.card if num_select is None else loaded.card.replace(num_select=int(num_select))
    reference = DeployModel(loaded.model, card, postprocess=not raw).eval()
    names = reference.output_names
    if not half:
        return reference, reference, card, names
    module = HalfDeploy(
        DeployModel(loaded.model, card, postprocess=not raw, selection_dtype=torch.float32)
    ).eval()
    return module, reference, card, names


def export_and_report(
    module: nn.Module,
    card,
    output_names,
    path: str | Path,
    *,
    batch: int,
    dynamic_batch: bool,
    opset: int,
    half: bool,
    sampler: str,
    simplify: bool,
    for_tensorrt: bool = False,
    int8: bool = False,
) -> OnnxExportResult:
    """Export ``module`` for ``card``; with ``for_tensorrt`` also refuse graphs TensorRT must not get."""
    result = export_onnx(
        module,
        path,
        resolution=card.resolution,
        output_names=output_names,
        card_metadata=card.to_metadata(),
        batch=batch,
        dynamic_batch=dynamic_batch,
        opset=opset,
        half=half,
        sampler=sampler,
        simplify=simplify,
        int8=int8,
    )
    if for_tensorrt:
        import onnx

        from rfdetr_export.trt_graph import trt_graph_problems

        problems = trt_graph_problems(onnx.load(str(result.path)), allow_plugins=sampler == "trt-plugin")
        if problems:
            raise ExportError(
                f"{result.path} is not fit for TensorRT ({len(problems)} problems): {'; '.join(problems[:3])}"
            )
    return result
