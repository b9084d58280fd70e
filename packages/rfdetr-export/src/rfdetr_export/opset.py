"""Lower an opset-18 ONNX graph to opset 17 (upstream rfdetr's default, and what older runtimes read).

torch's ONNX exporter (``dynamo=True``) writes opset 18; ``onnx.version_converter`` has no 18 -> 17 adapter
for ``Split`` and needs constant ``axes`` inputs, so the few operators whose schema changed in opset 18 are
rewritten here, on the optimised graph (where ``axes`` are initializers), and the rest is left as is.
Changes 17 -> 18 (onnx/docs/Changelog.md, "Version 18 of the default ONNX operator set"):

* ``Reduce{L1,L2,LogSum,LogSumExp,Max,Mean,Min,Prod,SumSquare}``: ``axes`` moved from an attribute to an
  input and ``noop_with_empty_axes`` came (``ReduceSum`` did both in 13) -> back to an attribute (it must be a
  constant), ``noop_with_empty_axes=0`` dropped.
* ``Split``: new ``num_outputs`` attribute -> a constant ``split`` input (needs the static axis length).
* ``Resize``: new ``antialias`` and ``keep_aspect_ratio_policy`` attributes -> dropped when at their defaults.
* ``Pad``: new ``axes`` input; ``ScatterND``/``ScatterElements``: ``max``/``min`` reductions;
  ``Col2Im``, ``BitwiseAnd/Or/Xor/Not``, ``CenterCropPad``, ``GroupNormalization``
  (and other new operators): no opset-17 form -> :class:`OpsetError`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rfdetr_core.errors import RFDETRError

_REDUCE_AXES_TO_ATTRIBUTE = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
}
# onnx.helper.VERSION_TABLE: ONNX 1.12 shipped opset 17 with IR version 8 (what TensorRT 8.6 / older ORT read).
_IR_VERSION_OF_OPSET17 = 8
_NEW_IN_18 = {
    "BitwiseAnd",
    "BitwiseNot",
    "BitwiseOr",
    "BitwiseXor",
    "CenterCropPad",
    "Col2Im",
    "GroupNormalization",
}


class OpsetError(RFDETRError, ValueError):
    """The graph uses an operator form that has no equivalent in the requested opset."""


def graph_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{name: value}`` of every initializer and ``Constant`` node output of ``model``'s graph."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _static_dim(model: onnx.ModelProto, name: str, axis: int) -> int | None:
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if info.name == name:
            dims = info.type.tensor_type.shape.dim
            if -len(dims) <= axis < len(dims) and dims[axis].HasField("dim_value"):
                return int(dims[axis].dim_value)
    return None


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


def lower_to_opset17(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite an opset-18 model (default domain) in place as opset 17 and return it.

    Raises :class:`OpsetError` naming the node when an operator cannot be expressed in opset 17.
    """
    versions = {o.domain: o.version for o in model.opset_import}
    if versions.get("", versions.get("ai.onnx")) == 17:
        return model
    if versions.get("", versions.get("ai.onnx")) != 18:
        raise OpsetError(f"can lower only opset 18 graphs to 17, this one is opset {versions}")
    if model.functions:
        raise OpsetError("the graph holds local functions; inline them before lowering the opset")
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    consts = graph_constants(model)
    extra_inits = []
    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op in _NEW_IN_18:
            raise OpsetError(f"node {node.name!r} ({op}) does not exist in opset 17; export with --opset 18")
        if op in _REDUCE_AXES_TO_ATTRIBUTE and len(node.input) > 1 and node.input[1]:
            axes = consts.get(node.input[1])
            if axes is None:
                raise OpsetError(f"node {node.name!r} ({op}) has computed axes; export with --opset 18")
            if _attr(node, "noop_with_empty_axes"):
                raise OpsetError(f"node {node.name!r} ({op}) uses noop_with_empty_axes, new in opset 18")
            _drop_attr(node, "noop_with_empty_axes")
            del node.input[1:]
            node.attribute.append(helper.make_attribute("axes", [int(a) for a in axes.reshape(-1)]))
        elif op == "Split" and _attr(node, "num_outputs") is not None:
            axis = int(_attr(node, "axis") or 0)
            parts = int(_attr(node, "num_outputs"))
            length = _static_dim(model, node.input[0], axis)
            if length is None:
                raise OpsetError(f"node {node.name!r} (Split) splits a dynamic axis; export with --opset 18")
            chunk = -(-length // parts)  # opset 18: all chunks ceil(length / n), the last one smaller
            sizes = [min(chunk, length - i * chunk) for i in range(parts)]
            name = f"{node.name}_split_sizes"
            extra_inits.append(numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), name))
            _drop_attr(node, "num_outputs")
            node.input.append(name)
        elif op == "Resize":
            if (_attr(node, "antialias") or 0) != 0:
                raise OpsetError(f"node {node.name!r} (Resize) uses antialias, new in opset 18")
            policy = _attr(node, "keep_aspect_ratio_policy")
            if policy not in (None, b"stretch", "stretch"):
                raise OpsetError(f"node {node.name!r} (Resize) uses keep_aspect_ratio_policy={policy!r}")
            _drop_attr(node, "antialias")
            _drop_attr(node, "keep_aspect_ratio_policy")
        elif op == "Pad" and len(node.input) > 3 and node.input[3]:
            raise OpsetError(f"node {node.name!r} (Pad) pads chosen axes, new in opset 18")
        elif op in ("ScatterND", "ScatterElements") and _attr(node, "reduction") in (b"max", b"min"):
            raise OpsetError(f"node {node.name!r} ({op}) uses a max/min reduction, new in opset 18")
    model.graph.initializer.extend(extra_inits)
    del model.graph.value_info[:]  # recomputed by the checker's shape inference; stale entries would mislead
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 17
    model.ir_version = min(model.ir_version, _IR_VERSION_OF_OPSET17)
    onnx.checker.check_model(model, full_check=True)
    return model
