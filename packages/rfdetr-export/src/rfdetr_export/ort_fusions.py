"""Rewrites of torch-exported patterns into ONNX Runtime's own fused operators (``com.microsoft`` contrib ops).

ONNX Runtime's graph optimiser fuses many patterns itself, but not two that torch's exporter writes in every
RF-DETR graph: exact GELU (:func:`fuse_gelu`) and the backbone's self-attention (:func:`fuse_attention`).
Fused, they compute the same functions in fewer passes over memory (seg-medium, 2-core Xeon, batch 1,
2026-12-07: float32 ``session.run`` about 530 -> 468 ms, int8 243 -> 232 ms on top of the GELU fusion).

The rewritten graph runs only in ONNX Runtime, so the files that must stay standard ONNX (the float32 and
fp16 exports, TensorRT's input) keep the exporter's nodes: ``--int8`` files are written fused (they are for
ONNX Runtime anyway), and :class:`rfdetr_export.runtime.OnnxRuntimeModel` fuses any other file in memory when
it loads it.
"""

from __future__ import annotations

import numpy as np
import onnx


def fuse_for_onnxruntime(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """Both fusions: ``(model, GELUs fused, attentions fused)``."""
    model, gelus = fuse_gelu(model)
    model, attentions = fuse_attention(model)
    return model, gelus, attentions


def _links(model: onnx.ModelProto) -> tuple[dict, dict, set[str]]:
    """``(producer, consumers, graph outputs)``: the node writing each value, the nodes reading it, and the
    names of the graph's outputs."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers, {o.name for o in model.graph.output}


def _only_user(consumers: dict, graph_outputs: set[str], name: str, op_type: str) -> onnx.NodeProto | None:
    """The one node reading ``name`` when it is an ``op_type`` and ``name`` is not a graph output, else ``None``
    (a value read elsewhere too must keep the node that writes it)."""
    users = consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != op_type or name in graph_outputs:
        return None
    return users[0]


def _use_contrib_domain(model: onnx.ModelProto) -> None:
    """Declare ONNX Runtime's ``com.microsoft`` operator domain in ``model`` (once)."""
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def _attr(node: onnx.NodeProto, name: str):
    """The value of ``node``'s attribute ``name`` (``None`` when it has none)."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


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
    (batch 1, 2-core Xeon, 2026-12-07). ``Gelu`` is an ONNX Runtime contrib operator (module docstring: where
    the rewritten graph is used).
    """
    from onnx import helper

    from rfdetr_export.opset import graph_constants

    constants = graph_constants(model)
    producer, consumers, graph_outputs = _links(model)

    def only_consumer(node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        return _only_user(consumers, graph_outputs, node.output[0], op_type)

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
    _use_contrib_domain(model)
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

    from rfdetr_export.opset import graph_constants

    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return model, 0  # subgraphs read outer names: the liveness pruning below does not follow them
    constants = graph_constants(model)
    producer, consumers, graph_outputs = _links(model)

    def single_user(name: str, op_type: str) -> onnx.NodeProto | None:
        return _only_user(consumers, graph_outputs, name, op_type)

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
    split_sizes: set[str] = set()
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or _attr(softmax, "axis") not in (None, -1):  # over the last axis
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
        sizes = f"mha_qkv_split_{width}"  # one initializer per width, shared by the attentions of that width
        if sizes not in split_sizes:
            split_sizes.add(sizes)
            graph.initializer.append(numpy_helper.from_array(np.array([width] * 3, np.int64), sizes))
        parts = [f"{prefix}_{p}" for p in "qkv"]
        new_nodes[id(merge)] = [
            helper.make_node("Split", [qkv, sizes], parts, axis=-1, name=f"{prefix}_split"),
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
    _use_contrib_domain(model)
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
