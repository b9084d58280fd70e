"""PyTorch module -> checked ONNX file: exporter, deformable-attention sampler, opset, fp16, metadata.

The exporter is torch's ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript): it keeps a
dynamic batch axis symbolic through every reshape (checked by running the graph at several batch sizes),
where the TorchScript exporter bakes traced Python sizes. It writes opset 18; :mod:`rfdetr_export.opset`
lowers it to 17 (the default, as upstream rfdetr) when asked.

Deformable attention is traced with the sampler ``--deform-attn`` asks for (:func:`sampler_backend`):
``gather`` (default; no GridSample), ``gridsample`` (the PyTorch reference path) or ``trt-plugin``
(NVIDIA's ``MultiscaleDeformableAttnPlugin_TRT`` node, which only TensorRT can run).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rfdetr_core.errors import RFDETRError, first_line

if TYPE_CHECKING:
    from rfdetr_export.int8 import QuantizeReport

SAMPLERS = ("gather", "gridsample", "trt-plugin")
INPUT_NAME = "images"
BATCH_DIM = "batch"
METADATA_CARD = "rfdetr_card"  # metadata_props key: the model card JSON (ModelCard.to_metadata())
METADATA_EXPORT = "rfdetr_export"  # metadata_props key: how the file was made (versions, options, outputs)
SUPPORTED_OPSETS = (17, 18)


class ExportError(RFDETRError):
    """The model could not be exported as asked; the message says why and what to change."""


@dataclass
class OnnxExportResult:
    """What :func:`export_onnx` wrote and how."""

    path: Path
    nodes: int  # node count of the written graph
    nodes_before_simplify: int | None  # None without --simplify
    size_bytes: int
    opset: int
    dynamic_batch: bool
    batch: int
    half: bool
    sampler: str
    output_names: tuple[str, ...]
    fp16_share: float | None = None  # share of compute nodes running in fp16 (``--half`` only)
    int8: QuantizeReport | None = None  # what ``--int8`` quantized (``None`` without it)
    op_types: dict[str, int] = field(default_factory=dict)


def sampler_backend(sampler: str) -> str:
    """The ``rfdetr_core.ops.use_backend`` name that traces ``sampler`` (``trt-plugin`` traces as gather
    and is swapped for the plugin node by the exporter's translation table)."""
    if sampler not in SAMPLERS:
        raise ExportError(f"--deform-attn {sampler!r} is not one of {', '.join(SAMPLERS)}.")
    return {"gather": "gather", "gridsample": "pytorch", "trt-plugin": "gather"}[sampler]


def _versions() -> dict[str, str]:
    import onnx

    from rfdetr_core import __version__ as core_version
    from rfdetr_export import __version__ as export_version

    return {
        "rfdetr_export": export_version,
        "rfdetr_core": core_version,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }


def _trace_to_onnx(module: nn.Module, example: torch.Tensor, dynamic_batch: bool, sampler: str, names):
    """Run torch's dynamo exporter (opset 18) and fold constants, quietly; returns the ``onnx.ModelProto``.

    onnxscript's full optimiser (its pattern rewriter) is not run: it took about 30 % of the export time and
    ONNX Runtime and TensorRT fuse the graph themselves at load; ``--simplify`` runs onnxslim on top.
    """
    from rfdetr_core.deploy import MAX_DYNAMIC_BATCH
    from rfdetr_core.ops import use_backend

    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM, min=1, max=MAX_DYNAMIC_BATCH)},) if dynamic_batch else None
    table = None
    if sampler == "trt-plugin":
        from rfdetr_export.trt_plugin import translation_table

        table = translation_table()
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            use_backend(sampler_backend(sampler)),
            torch.no_grad(),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                None,
                dynamo=True,
                opset_version=18,
                input_names=[INPUT_NAME],
                output_names=list(names),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=table,
                optimize=False,  # constant folding only, below: the default rewrite rules took 30% of the time
                verify=False,
                report=False,
                external_data=False,
            )
    except Exception as exc:
        if os.environ.get("RFDETR_EXPORT_DEBUG"):
            print(out.getvalue(), err.getvalue())
        tail = (out.getvalue() + err.getvalue()).strip().splitlines()[-3:]
        raise ExportError(
            f"torch's ONNX exporter failed: {type(exc).__name__}: {first_line(exc)}"
            + (f" ({' | '.join(tail)})" if tail else "")
        ) from exc
    import onnx_ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(program.model)
    onnx_ir.passes.Sequential(
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.DeduplicateInitializersPass(),
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(),
    )(program.model)
    unused = [name for name, value in program.model.graph.initializers.items() if not value.uses()]
    for name in unused:  # folded-away weights the passes above leave behind
        del program.model.graph.initializers[name]
    return program.model_proto


def count_fp16_share(model) -> float:
    """Share of compute nodes (everything but Cast/Constant/shape plumbing) whose first float output is fp16."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    plumbing = {
        "Cast",
        "Constant",
        "Shape",
        "Reshape",
        "Transpose",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Gather",
        "Slice",
        "Expand",
        "Identity",
        "Flatten",
        "Split",
    }
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    half = total = 0
    for node in inferred.graph.node:
        if node.op_type in plumbing:
            continue
        dtype = next((types[o] for o in node.output if types.get(o) in floats), None)
        if dtype is None:
            continue
        total += 1
        half += dtype == onnx.TensorProto.FLOAT16
    return half / total if total else 0.0


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    resolution: tuple[int, int],
    output_names: Sequence[str],
    card_metadata: dict,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
    half: bool = False,
    sampler: str = "gather",
    simplify: bool = False,
    int8: bool = False,
) -> OnnxExportResult:
    """Export ``module`` (``images [B, 3, H, W]`` float32 -> a tuple of ``output_names`` tensors) to ``path``.

    Args:
        module: the deploy module: float32 ``images`` in, a tuple of float32/int64 tensors out, no Python
            checks on the batch (for ``half``, one whose inside runs in fp16: ``export_model.HalfDeploy``).
        resolution: ``(H, W)`` of the input (fixed in the graph).
        output_names: names of the module's outputs, in order.
        card_metadata: ``ModelCard.to_metadata()``; stored as JSON under ``metadata_props["rfdetr_card"]``.
        batch: the batch size of a static graph (ignored with ``dynamic_batch``).
        dynamic_batch: make axis 0 of the input and every output symbolic (``batch``).
        opset: 17 (default) or 18.
        half: the module computes in fp16: LayerNorm/Softmax are moved back to float32
            (:mod:`rfdetr_export.half`) and the fp16 share is reported.
        sampler: deformable-attention sampler, one of :data:`SAMPLERS`.
        simplify: run onnxslim on the graph (extra ``simplify``).
        int8: quantize the linear layers' weights to int8 after everything else (:mod:`rfdetr_export.int8`;
            a float32 ``module``).

    Returns:
        An :class:`OnnxExportResult`; the file is written atomically and passes ``onnx.checker`` (full check).
    """
    from rfdetr_core.errors import require

    onnx = require("onnx", "onnx", "rfdetr-export")
    require("onnxscript", "onnx", "rfdetr-export")
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"--opset {opset} is not supported; use one of {', '.join(map(str, SUPPORTED_OPSETS))}."
        )
    if batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")
    if int8 and half:
        raise ExportError("--int8 and --half exclude each other: choose one precision.")
    if int8:
        require("onnxruntime", "onnx", "rfdetr-export")  # its quantizer; fail before the slow trace
    sampler_backend(sampler)  # validates the name
    path = Path(path)
    _check_writable(path)
    height, width = resolution
    # A dynamic axis needs an example of size >= 2 (torch.export specialises sizes 0 and 1).
    example_batch = 2 if dynamic_batch else batch
    example = torch.zeros(example_batch, 3, height, width)
    model = _trace_to_onnx(module.eval(), example, dynamic_batch, sampler, output_names)
    if half:
        from rfdetr_export.half import keep_float32_islands

        model = keep_float32_islands(model)
    if opset == 17:
        from rfdetr_export.opset import lower_to_opset17

        model = lower_to_opset17(model)
    nodes_before = None
    if simplify:
        onnxslim = require("onnxslim", "simplify", "rfdetr-export")
        nodes_before = len(model.graph.node)
        with contextlib.redirect_stdout(io.StringIO()):
            model = onnxslim.slim(model)
    quantized = None
    if int8:
        from rfdetr_export.int8 import quantize_int8

        model, quantized = quantize_int8(model)
    export_info = {
        **_versions(),
        "opset": opset,
        "dynamic_batch": dynamic_batch,
        "batch": None if dynamic_batch else batch,
        "half": half,
        "int8": int8,
        "deform_attn": sampler,
        "input": INPUT_NAME,
        "outputs": list(output_names),
    }
    del model.metadata_props[:]
    for key, value in ((METADATA_CARD, card_metadata), (METADATA_EXPORT, export_info)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    model.producer_name = "rfdetr-export"
    onnx.checker.check_model(model, full_check=sampler != "trt-plugin")
    from rfdetr_core.atomic_io import atomic_path

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return OnnxExportResult(
        path=path,
        nodes=len(model.graph.node),
        nodes_before_simplify=nodes_before,
        size_bytes=path.stat().st_size,
        opset=opset,
        dynamic_batch=dynamic_batch,
        batch=batch,
        half=half,
        sampler=sampler,
        output_names=tuple(output_names),
        fp16_share=count_fp16_share(model) if half else None,
        int8=quantized,
        op_types=counts,
    )


def _check_writable(path: Path) -> None:
    """Fail before the (slow) export when ``path`` cannot be written."""
    if path.is_dir():
        raise ExportError(f"--output {path} is a folder; give a file name such as {path / 'model.onnx'}.")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"cannot write {path}: {probe} is a file, not a folder. Choose another --output.")
    if not os.access(probe, os.W_OK):
        raise ExportError(f"cannot write {path}: {probe} is not writable. Choose another --output.")


def read_metadata(model) -> tuple[dict, dict]:
    """``(card_metadata, export_info)`` from an ``onnx.ModelProto`` (or ONNX Runtime ``ModelMetadata``'s
    ``custom_metadata_map``); :class:`ExportError` when the file was not made by rfdetr-export."""
    props = model if isinstance(model, dict) else {p.key: p.value for p in model.metadata_props}
    if METADATA_CARD not in props:
        raise ExportError(
            "this ONNX file has no rfdetr model card (metadata_props['rfdetr_card']); export it with rfdetr-export."
        )
    return json.loads(props[METADATA_CARD]), json.loads(props.get(METADATA_EXPORT, "{}"))
