"""``--int8``: dynamic int8 quantization of an exported float32 graph, for ONNX Runtime on CPUs.

Every MatMul with a constant 2-d weight (the linear layers: the backbone's attention projections and MLPs,
the projector's and decoder's linears, the heads) gets int8 weights, one scale per output channel, and
activations quantized to uint8 at run time, one scale per tensor (ONNX Runtime's dynamic quantization,
``onnxruntime.quantization.quantize_dynamic``; standard ``DynamicQuantizeLinear`` + ``MatMulInteger`` nodes,
which ONNX Runtime fuses into one kernel with VNNI / AMX int8 instructions where the CPU has them). Matrix
products of two activations (attention scores, the mask dot products), convolutions, LayerNorm and softmax
stay in float32, and so do inputs and outputs: the graph contract is unchanged. Each exact GELU becomes one
ONNX Runtime ``com.microsoft.Gelu`` node and each backbone self-attention one
``com.microsoft.MultiHeadAttention`` node (:mod:`rfdetr_export.ort_fusions`), so the file is for ONNX Runtime.

The weights must be initializers for the quantizer to see them, while the exported graph computes some
(for example the folded LayerScale of the backbone's MLP, a ``Mul`` and ``Transpose`` of constants) at run
time, which ONNX Runtime folds only when it loads the file: :func:`fold_weights` folds these, and only these,
first (ONNX Runtime's own ``quant_pre_process`` would fold them too, but its optimiser also fuses a static
batch's MatMul + Add into Gemm, which dynamic quantization leaves in float32).

Two properties to know (both in the README): activation ranges are per tensor, so in one run over a batch an
image's result depends on the other images (the ONNX Runtime runner therefore runs a dynamic-batch int8 graph
one image at a time, :mod:`rfdetr_export.runtime`); and the precision loss depends on the weights, which is why
the export's check compares only the detections the float32 model is confident about
(:data:`rfdetr_export.check.TOLERANCES` ``"int8"``) and ``rfdetr-train val --weights model_int8.onnx`` is the way
to measure it on a dataset.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from rfdetr_export.ort_fusions import fuse_for_onnxruntime


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_int8` changed."""

    quantized: int  # MatMul nodes given int8 weights
    matmuls: int  # MatMul nodes in the float32 graph after constant folding
    gelus: int  # exact GELUs fused into one ONNX Runtime ``Gelu`` node each
    attentions: int  # backbone self-attentions fused into one ONNX Runtime ``MultiHeadAttention`` node each
    float32_bytes: int  # initializer bytes before
    int8_bytes: int  # initializer bytes after


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def constant_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is a 2-d initializer (``x [..., K] @ W [K, N]``); a
    1-d weight (a matrix-vector product) has no output channels to scale per channel and is left alone."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1]) == 2]


def fold_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every MatMul weight computed from constants alone (a ``Transpose``, a ``Mul`` by a
    LayerScale, ...) folded into an initializer; nothing else is folded, so no other constant grows the file."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    graph = model.graph
    constant = {t.name for t in graph.initializer}
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:  # topological order: a node's inputs are known before it
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input if i)):
            constant.update(node.output)
    cone: set[str] = set()  # names of the nodes computing a MatMul weight from constants
    stack = [producer[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in producer]
    while stack:
        node = stack.pop()
        if node.name in cone or not all(o in constant for o in node.output):
            continue
        cone.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    if not cone:
        return model
    ir_model = ir.serde.deserialize_model(model)
    onnxscript.optimizer.fold_constants(
        ir_model, should_fold=lambda node: True if node.name in cone else None
    )
    ir.passes.Sequential(
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.RemoveUnusedNodesPass(),
    )(ir_model)
    return ir.serde.serialize_model(ir_model)


def quantize_int8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, QuantizeReport]:
    """The int8 version of a float32 graph (module docstring); metadata and outputs are kept.

    Raises:
        ExportError: the graph has no MatMul with a constant weight (nothing to quantize).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from rfdetr_export.onnx_export import ExportError

    folded_model = fold_weights(model)
    nodes = constant_weight_matmuls(folded_model)
    if not nodes:
        raise ExportError("--int8: the graph has no MatMul with a constant weight, nothing to quantize.")
    with tempfile.TemporaryDirectory(prefix="rfdetr-int8-") as tmp:
        folded, out = Path(tmp, "folded.onnx"), Path(tmp, "int8.onnx")
        onnx.save(folded_model, str(folded))
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a pre-processing advice at WARNING
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                quantize_dynamic(
                    str(folded),
                    str(out),
                    op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=nodes,
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                )
        finally:
            logging.getLogger().setLevel(level)
        quantized, gelus, attentions = fuse_for_onnxruntime(onnx.load(str(out)))
    report = QuantizeReport(
        quantized=sum(1 for n in quantized.graph.node if n.op_type == "MatMulInteger"),
        matmuls=sum(1 for n in folded_model.graph.node if n.op_type == "MatMul"),
        float32_bytes=_initializer_bytes(folded_model),
        int8_bytes=_initializer_bytes(quantized),
        gelus=gelus,
        attentions=attentions,
    )
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    return quantized, report
