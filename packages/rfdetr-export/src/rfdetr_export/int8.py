"""``--int8``: dynamic int8 quantization of an exported float32 graph, for ONNX Runtime on CPUs.

Every MatMul with a constant 2-d weight (the linear layers: the backbone's attention projections and MLPs,
the projector's and decoder's linears, the heads) gets int8 weights, one scale per output channel, and
activations quantized to uint8 at run time, one scale per tensor (ONNX Runtime's dynamic quantization,
``onnxruntime.quantization.quantize_dynamic``; standard ``DynamicQuantizeLinear`` + ``MatMulInteger`` nodes,
which ONNX Runtime fuses into one kernel with VNNI / AMX int8 instructions where the CPU has them). Matrix
products of two activations (attention scores, the mask dot products), convolutions, LayerNorm and softmax
stay in float32, and so do inputs and outputs: the graph contract is unchanged. Each exact GELU becomes one
ONNX Runtime ``com.microsoft.Gelu`` node (:func:`fuse_gelu`) and each backbone self-attention one
``com.microsoft.MultiHeadAttention`` node (:func:`fuse_attention`), so the file is for ONNX Runtime.

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

import numpy as np
import onnx


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
        quantized, gelus = fuse_gelu(onnx.load(str(out)))
        quantized, attentions = fuse_attention(quantized)
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


def _is_scalar(value, expected: float) -> bool:
    return value is not None and value.size == 1 and abs(float(value.reshape(-1)[0]) - expected) < 1e-4


def _other_input(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input ``node`` that is not ``name`` (``None`` when both are)."""
    return next((i for i in node.input if i != name), None)


def fuse_gelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with each exact GELU written as torch's exporter writes it,
    ``x -> Div(sqrt 2) -> Erf -> Add(1) -> Mul(0.5) -> Mul(x)``, replaced by one ``com.microsoft.Gelu`` node;
    returns the model and the number fused.

    ONNX Runtime fuses the same function itself only where the ``0.5`` multiplies first or last (its
    ``GeluFusion`` patterns), not in this order, so the five element-wise passes over the backbone's
    ``[.., 4 * dim]`` MLP activations stayed: fused, seg-medium's int8 ``session.run`` went from 295 to 271 ms
    (batch 1, 2-core Xeon, 2026-12-07). ``Gelu`` is an ONNX Runtime contrib operator; the int8 graph is meant
    for ONNX Runtime anyway (its float32 export, the one for TensorRT, is left as it is).
    """
    from onnx import helper

    from rfdetr_export.opset import graph_constants

    constants = graph_constants(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}

    def only_consumer(node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != op_type or node.output[0] in graph_outputs:
            return None
        return users[0]

    removed: set[int] = set()
    replacement: dict[int, onnx.NodeProto] = {}
    for erf in model.graph.node:
        if erf.op_type != "Erf":
            continue
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not _is_scalar(constants.get(div.input[1]), 2**0.5):
            continue
        x = div.input[0]
        add = only_consumer(erf, "Add")
        if add is None or not _is_scalar(
            constants.get(_other_input(add, erf.output[0])), 1.0
        ):
            continue
        half = only_consumer(add, "Mul")
        if half is None or not _is_scalar(
            constants.get(_other_input(half, add.output[0])), 0.5
        ):
            continue
        times_x = only_consumer(half, "Mul")
        if times_x is None or sorted(times_x.input) != sorted([x, half.output[0]]):
            continue
        if len(consumers.get(div.output[0], [])) != 1 or div.output[0] in graph_outputs:
            continue
        removed.update(id(n) for n in (div, erf, add, half))
        replacement[id(times_x)] = helper.make_node(
            "Gelu", [x], [times_x.output[0]], name=f"{times_x.name}_gelu", domain="com.microsoft"
        )
    if not replacement:
        return model, 0
    nodes = [replacement.get(id(n), n) for n in model.graph.node if id(n) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, len(replacement)


def _scalar(constants: dict, producer: dict, name: str) -> float | None:
    """The value of a one-element constant ``name``, looking through a ``CastLike`` of one."""
    node = producer.get(name)
    if node is not None and node.op_type == "CastLike":
        name = node.input[0]
    value = constants.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _qkv_split(node: onnx.NodeProto, producer: dict, constants: dict) -> tuple[str, int, int] | None:
    """``(qkv, heads, head_dim)`` when ``node`` is ``Transpose(perm [2, 0, 3, 1, 4])`` of ``qkv [N, T, 3C]``
    reshaped to ``[N, T, 3, heads, head_dim]`` (:class:`rfdetr_core.models.backbone.ViTAttention`), else ``None``."""
    from rfdetr_export.opset import _attr

    if node.op_type != "Transpose" or list(_attr(node, "perm") or []) != [2, 0, 3, 1, 4]:
        return None
    reshape = producer.get(node.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    shape = constants.get(reshape.input[1])
    if shape is not None:
        tail = [int(v) for v in shape.reshape(-1)[2:]]
    else:  # dynamic batch: Concat(batch, tokens, [3], [heads], [head_dim])
        concat = producer.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 5:
            return None
        parts = [constants.get(name) for name in concat.input[2:]]
        if any(p is None or p.size != 1 for p in parts):
            return None
        tail = [int(p.reshape(-1)[0]) for p in parts]
    if len(tail) != 3 or tail[0] != 3 or min(tail) < 1:
        return None
    return reshape.input[0], tail[1], tail[2]


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with each backbone self-attention, as torch's exporter writes ``scaled_dot_product_attention``
    of :class:`rfdetr_core.models.backbone.ViTAttention`, replaced by ``Split`` + one
    ``com.microsoft.MultiHeadAttention`` node; returns the model and the number fused.

    The pattern: ``qkv [N, T, 3C]`` reshaped to ``[N, T, 3, heads, d]`` and transposed to ``[3, N, heads, T, d]``;
    ``q``, ``k``, ``v`` gathered from it; ``MatMul(q * a, kT * b)`` (``kT`` = ``k`` with its last two axes
    swapped, through reshapes, as the exporter writes it) -> ``Softmax`` -> ``MatMul(., v)`` -> ``Transpose
    (perm [0, 2, 1, 3])`` -> ``Reshape`` to ``[N, T, C]``. ONNX Runtime's CPU kernel computes the same
    ``softmax(q k^T * a * b) v`` per head without materialising the transposes: seg-medium's int8
    ``session.run`` 243 -> 233 ms (batch 1, 2-core Xeon, 2026-12-07). Anything else (a mask added to the
    scores, another consumer of an intermediate) is left alone.
    """
    from onnx import helper, numpy_helper

    from rfdetr_export.opset import _attr, graph_constants

    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return model, 0  # subgraphs read outer names: the liveness pruning below does not follow them
    constants = graph_constants(model)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def single_user(name: str, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or name in graph_outputs:
            return None
        return users[0]

    def gathered(name: str) -> tuple[onnx.NodeProto, int] | None:
        """``(transpose, index)`` when ``name`` is ``Gather(transpose, index, axis=0)``."""
        node = producer.get(name)
        if node is None or node.op_type != "Gather" or (_attr(node, "axis") or 0) != 0:
            return None
        index = constants.get(node.input[1])
        source = producer.get(node.input[0])
        if index is None or index.size != 1 or source is None:
            return None
        return source, int(index.reshape(-1)[0])

    def transposed_key(name: str) -> str | None:
        """The tensor whose last two axes ``name`` swaps through ``Reshape`` nodes and one ``Transpose``."""
        swaps = 0
        node = producer.get(name)
        while node is not None and node.op_type in ("Reshape", "Transpose"):
            if node.op_type == "Transpose":
                perm = list(_attr(node, "perm") or [])
                if perm[:-2] != list(range(len(perm) - 2)) or perm[-2:] != [len(perm) - 1, len(perm) - 2]:
                    return None
                swaps += 1
            name = node.input[0]
            node = producer.get(name)
        return name if swaps == 1 else None

    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or (_attr(softmax, "axis") if _attr(softmax, "axis") is not None else -1) != -1:
            continue
        scores = producer.get(softmax.input[0])
        mix = single_user(softmax.output[0], "MatMul")
        if scores is None or scores.op_type != "MatMul" or mix is None or mix.input[0] != softmax.output[0]:
            continue
        q_mul, k_mul = producer.get(scores.input[0]), producer.get(scores.input[1])
        if q_mul is None or k_mul is None or q_mul.op_type != "Mul" or k_mul.op_type != "Mul":
            continue
        q_scale = _scalar(constants, producer, q_mul.input[1])
        k_scale = _scalar(constants, producer, k_mul.input[1])
        key = transposed_key(k_mul.input[0])
        picks = [gathered(q_mul.input[0]), gathered(key) if key else None, gathered(mix.input[1])]
        if q_scale is None or k_scale is None or any(p is None for p in picks):
            continue
        split = picks[0][0]
        if any(p[0] is not split for p in picks) or [p[1] for p in picks] != [0, 1, 2]:
            continue
        found = _qkv_split(split, producer, constants)
        out_t = single_user(mix.output[0], "Transpose")
        if found is None or out_t is None or list(_attr(out_t, "perm") or []) != [0, 2, 1, 3]:
            continue
        merge = single_user(out_t.output[0], "Reshape")
        if merge is None:
            continue
        qkv, heads, head_dim = found
        width = heads * head_dim
        prefix = f"{merge.name}_mha"
        sizes = numpy_helper.from_array(np.array([width] * 3, np.int64), f"{prefix}_sizes")
        graph.initializer.append(sizes)
        parts = [f"{prefix}_{p}" for p in "qkv"]
        new_nodes[id(merge)] = [
            helper.make_node("Split", [qkv, sizes.name], parts, axis=-1, name=f"{prefix}_split"),
            helper.make_node(
                "MultiHeadAttention",
                parts,
                [merge.output[0]],
                name=prefix,
                domain="com.microsoft",
                num_heads=heads,
                scale=q_scale * k_scale,
            ),
        ]
        removed.add(id(merge))
    if not new_nodes:
        return model, 0
    nodes = []
    for node in graph.node:
        nodes.extend(new_nodes.get(id(node), [] if id(node) in removed else [node]))
    del graph.node[:]
    graph.node.extend(_live(nodes, graph_outputs))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, len(new_nodes)


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` (in order) that an output depends on: what a fusion left unread goes."""
    by_output = {out: node for node in nodes for out in node.output}
    live: set[int] = set()
    stack = list(outputs)
    while stack:
        node = by_output.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(name for name in node.input if name)
    return [node for node in nodes if id(node) in live]
