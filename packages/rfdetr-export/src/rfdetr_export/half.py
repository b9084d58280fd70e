"""fp16 graphs whose overflow-prone operators stay in float32.

``--half`` traces the deploy module after ``.half()`` behind a float32 boundary (float32 ``images`` in,
float32 outputs out), so weights and most compute are fp16 and precision lives in the graph itself, as
TensorRT >= 10 strongly typed networks require (TensorRT 11 has no FP16 builder flag; rf-detr#1453).
:func:`keep_float32_islands` then moves the operators that overflow or lose too much in fp16 back to float32
(rf-detr#352 and #445: LayerNorm variants; softmax sums), with a Cast on each edge between the two worlds
and none between two float32 operators. The deformable sampler's pixel coordinates are float32 already
(:func:`rfdetr_core.ops.deform_attn.ms_deform_attn_gather` promotes them), and the backbone's position table
is baked at export in float32 and stored as an fp16 constant (values of order 1: no overflow).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

# Operators computed in float32 inside an fp16 graph.
FLOAT32_OPS = frozenset({"LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"})


def keep_float32_islands(model: onnx.ModelProto, ops: frozenset[str] = FLOAT32_OPS) -> onnx.ModelProto:
    """Run every node of a type in ``ops`` whose float inputs are fp16 in float32 instead; returns the model.

    fp16 initializers used only by such nodes (LayerNorm scale/bias) are stored as float32; other inputs get a
    ``Cast(to=FLOAT)`` shared by all consumers; outputs are produced in float32 and cast back to fp16 only
    for consumers that are not float32 operators themselves (and for graph outputs).
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for v in list(inferred.graph.input) + list(inferred.graph.output):
        types[v.name] = v.type.tensor_type.elem_type
    inits = {t.name: t for t in model.graph.initializer}
    for name, tensor in inits.items():
        types[name] = tensor.data_type
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}

    def is_island(node: onnx.NodeProto) -> bool:
        return (
            node.domain in ("", "ai.onnx")
            and node.op_type in ops
            and any(types.get(i) == TensorProto.FLOAT16 for i in node.input if i)
        )

    as_float32: dict[str, str] = {}  # fp16 value -> the name of its float32 copy
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if not is_island(node):
            new_nodes.append(node)
            continue
        for k, name in enumerate(node.input):
            if not name or types.get(name) != TensorProto.FLOAT16:
                continue
            if name not in as_float32:
                if name in inits and all(is_island(c) for c in consumers.get(name, [])):
                    array = numpy_helper.to_array(inits[name]).astype("float32")
                    inits[name].CopyFrom(numpy_helper.from_array(array, name))
                    types[name] = TensorProto.FLOAT
                    as_float32[name] = name
                else:
                    cast_name = f"{name}__f32"
                    new_nodes.append(
                        helper.make_node(
                            "Cast", [name], [cast_name], to=TensorProto.FLOAT, name=f"{cast_name}_cast"
                        )
                    )
                    as_float32[name] = cast_name
            node.input[k] = as_float32[name]
        for k, name in enumerate(node.output):
            if types.get(name) != TensorProto.FLOAT16:
                continue
            f32 = f"{name}__f32"
            node.output[k] = f32
            as_float32[name] = f32
        new_nodes.append(node)
        for name, f32 in zip([o.removesuffix("__f32") for o in node.output], node.output, strict=True):
            if f32 == name:
                continue
            needs_fp16 = name in graph_outputs or any(not is_island(c) for c in consumers.get(name, []))
            if needs_fp16:
                new_nodes.append(
                    helper.make_node("Cast", [f32], [name], to=TensorProto.FLOAT16, name=f"{name}_cast_fp16")
                )
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    del model.graph.value_info[:]  # stale fp16 entries for values that are float32 now
    return model
