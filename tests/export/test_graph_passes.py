"""Graph passes on small hand-made ONNX graphs: opset 18 -> 17, fp16 islands, TensorRT fitness, the int8
file's GELU and attention fusions (fast: no model export; the attention test exports one attention layer)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rfdetr_export.half import keep_float32_islands  # noqa: E402
from rfdetr_export.opset import OpsetError, lower_to_opset17  # noqa: E402
from rfdetr_export.ort_fusions import fuse_attention, fuse_gelu  # noqa: E402
from rfdetr_export.trt_graph import TRT_PARSER_OPS, trt_graph_problems  # noqa: E402


def _model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _opset18_graph():
    """x [2, 6, 4, 4] -> ReduceMax(axes input) and Split(num_outputs=3) and Resize(antialias=0) outputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 4, 4])
    shapes = {
        "m": [2, 1, 4, 1],
        "s0": [2, 2, 4, 4],
        "s1": [2, 2, 4, 4],
        "s2": [2, 2, 4, 4],
        "r": [2, 6, 8, 8],
    }
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    inits = [
        numpy_helper.from_array(np.array([1, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([2, 6, 8, 8], np.int64), "sizes"),
    ]
    nodes = [
        helper.make_node("ReduceMax", ["x", "axes"], ["m"], keepdims=1, noop_with_empty_axes=0, name="rmax"),
        helper.make_node("Split", ["x"], ["s0", "s1", "s2"], axis=1, num_outputs=3, name="split"),
        helper.make_node(
            "Resize",
            ["x", "", "", "sizes"],
            ["r"],
            mode="linear",
            antialias=0,
            keep_aspect_ratio_policy="stretch",
            name="resize",
        ),
    ]
    return _model(nodes, [x], outs, inits)


def test_lower_to_opset17_keeps_the_numbers():
    model = _opset18_graph()
    feed = {"x": np.random.default_rng(0).normal(size=(2, 6, 4, 4)).astype(np.float32)}
    expected = _run(model, feed)
    lowered = lower_to_opset17(model)
    assert [o.version for o in lowered.opset_import if o.domain == ""] == [17]
    assert lowered.ir_version == 8
    onnx.checker.check_model(lowered, full_check=True)
    split = next(n for n in lowered.graph.node if n.op_type == "Split")
    assert len(split.input) == 2 and not any(a.name == "num_outputs" for a in split.attribute)
    for got, want in zip(_run(lowered, feed), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_lower_to_opset17_refuses_what_opset17_cannot_say():
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [4])
    model = _model([helper.make_node("BitwiseNot", ["x"], ["y"], name="bn")], [x], [y])
    with pytest.raises(OpsetError, match="'bn' \\(BitwiseNot\\) does not exist in opset 17"):
        lower_to_opset17(model)
    xf = helper.make_tensor_value_info("xf", TensorProto.FLOAT, [2, 3])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    m = helper.make_tensor_value_info("m", TensorProto.FLOAT, ["a", "b"])
    computed = _model([helper.make_node("ReduceMax", ["xf", "axes"], ["m"], name="r")], [xf, axes], [m])
    with pytest.raises(OpsetError, match="computed axes"):
        lower_to_opset17(computed)


def _fp16_layernorm_softmax_graph():
    """x fp16 [2, 8] -> LayerNorm (fp16 scale/bias) -> Softmax -> Mul(fp16 const) -> y fp16."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 8])
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(size=8).astype(np.float16), "scale"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float16), "bias"),
        numpy_helper.from_array(np.full(8, 2.0, np.float16), "two"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["ln"], axis=-1, name="ln"),
        helper.make_node("Softmax", ["ln"], ["sm"], axis=-1, name="sm"),
        helper.make_node("Mul", ["sm", "two"], ["y"], name="mul"),
    ]
    return _model(nodes, [x], [y], inits, opset=17)


def test_float32_islands_cast_only_at_the_borders():
    model = keep_float32_islands(_fp16_layernorm_softmax_graph())
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    inits = {t.name: t.data_type for t in model.graph.initializer}
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    sm = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert inits["scale"] == inits["bias"] == TensorProto.FLOAT  # only LayerNorm reads them: stored float32
    assert inits["two"] == TensorProto.FLOAT16
    assert types[ln.input[0]] == TensorProto.FLOAT and sm.input[0] == ln.output[0]  # no cast between islands
    assert types[sm.output[0]] == TensorProto.FLOAT
    assert [n.op_type for n in model.graph.node].count("Cast") == 2  # in before LayerNorm, out after Softmax
    x = np.random.default_rng(2).normal(size=(2, 8)).astype(np.float16) * 100
    scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "scale"))
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "bias"))
    xf = x.astype(np.float32)
    norm = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-5) * scale + bias
    soft = np.exp(norm - norm.max(-1, keepdims=True))
    want = 2 * soft / soft.sum(-1, keepdims=True)
    (got,) = _run(model, {"x": x})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3)


def _node_graph(op, inputs_info, extra_nodes=(), inits=(), out_type=TensorProto.FLOAT, **attrs):
    outs = [helper.make_tensor_value_info("y", out_type, None)]
    nodes = [
        *extra_nodes,
        helper.make_node(
            op,
            [i.name for i in inputs_info] + [t.name for t in inits if t.name.startswith("arg")],
            ["y"],
            name=f"{op.lower()}_node",
            **attrs,
        ),
    ]
    return helper.make_model(
        helper.make_graph(nodes, "g", inputs_info, outs, initializer=list(inits)),
        opset_imports=[helper.make_opsetid("", 17)],
    )


def test_trt_graph_problems_finds_gridsample_unknown_ops_and_scatter_shapes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    grid = helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 2, 2, 2])
    problems = trt_graph_problems(_node_graph("GridSample", [x, grid]))
    assert len(problems) == 1 and "GridSample" in problems[0] and "gather" in problems[0]
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [5])
    (problem,) = trt_graph_problems(_node_graph("Unique", [v]))
    assert "Unique is not supported by the TensorRT ONNX parser" in problem
    # shape = ScatterND(Shape(x), [[0]], [-1]) -> Reshape(x, shape): a shape tensor built with ScatterND
    inits = [
        numpy_helper.from_array(np.array([[0]], np.int64), "idx"),
        numpy_helper.from_array(np.array([1], np.int64), "upd"),
    ]
    extra = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("ScatterND", ["shape", "idx", "upd"], ["new_shape"], name="scatter"),
    ]
    graph = helper.make_graph(
        extra + [helper.make_node("Reshape", ["x", "new_shape"], ["y"], name="reshape")],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    problems = trt_graph_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert problems == ["reshape: its shape input 'new_shape' is built with ScatterND"]
    clean = _node_graph("Relu", [x])
    assert trt_graph_problems(clean) == []
    assert {"GatherElements", "LayerNormalization", "TopK", "Floor", "MatMul"} <= TRT_PARSER_OPS


def _gelu_graph(div_by: float, extra_use: bool = False):
    """``y = x * (0.5 * (1 + erf(x / div_by)))`` as torch's exporter writes GELU; ``extra_use`` also outputs
    the Erf's result (then the pattern must stay)."""
    inits = [
        numpy_helper.from_array(np.array(v, dtype=np.float32), name)
        for name, v in (("c_div", div_by), ("c_one", 1.0), ("c_half", 0.5))
    ]
    nodes = [
        helper.make_node("Div", ["x", "c_div"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "c_one"], ["a"]),
        helper.make_node("Mul", ["c_half", "a"], ["h"]),
        helper.make_node("Mul", ["x", "h"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 5]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    return _model(nodes, [x], outputs, inits, opset=17)


def test_fuse_gelu_replaces_the_exporters_pattern_with_the_same_function():
    import torch

    x = np.linspace(-4, 4, 10, dtype=np.float32).reshape(2, 5)
    model, fused = fuse_gelu(_gelu_graph(2**0.5))
    assert fused == 1 and [n.op_type for n in model.graph.node] == ["Gelu"]
    onnx.checker.check_model(model)
    got = _run(model, {"x": x})[0]
    expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("div_by, extra_use", [(2.0, False), (2**0.5, True)])
def test_fuse_gelu_leaves_other_functions_alone(div_by, extra_use):
    """Another constant is not GELU; an intermediate read elsewhere must keep its node."""
    model, fused = fuse_gelu(_gelu_graph(div_by, extra_use))
    assert fused == 0 and len(model.graph.node) == 5


def test_fuse_gelu_leaves_an_add_of_a_value_to_itself_alone():
    model = _gelu_graph(2**0.5)
    add = next(n for n in model.graph.node if n.op_type == "Add")
    add.input[1] = add.input[0]  # erf(x) + erf(x): no constant operand to read
    model, fused = fuse_gelu(model)
    assert fused == 0 and len(model.graph.node) == 5


def _attention_graph(tmp_path, dynamic: bool, masked: bool = False):
    """core's ``ViTAttention`` (dim 16, 4 heads) exported as the model export writes it: ``x [N, 7, 16]``.
    ``masked`` adds a constant bias to the scores, which the fusion must leave alone."""
    import torch
    import torch.nn.functional as F

    from rfdetr_core.models.backbone import ViTAttention

    class Masked(ViTAttention):
        def forward(self, x):
            n, t, c = x.shape
            qkv = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=torch.ones(t, t))
            return self.proj(out.transpose(1, 2).reshape(n, t, c))

    torch.manual_seed(0)
    module = (Masked if masked else ViTAttention)(16, 4).eval()
    path = tmp_path / "attention.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        module,
        (torch.randn(2, 7, 16),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: batch},) if dynamic else None,
    )
    return onnx.load(str(path)), module


@pytest.mark.parametrize("dynamic", [False, True])
def test_fuse_attention_replaces_the_exported_attention_with_the_same_function(tmp_path, dynamic):
    import torch

    model, module = _attention_graph(tmp_path, dynamic)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 1
    fused_model, fused = fuse_attention(onnx.ModelProto.FromString(model.SerializeToString()))
    assert fused == 1
    ops = [n.op_type for n in fused_model.graph.node]
    assert "MultiHeadAttention" in ops and "Softmax" not in ops and "Transpose" not in ops
    onnx.checker.check_model(fused_model)
    for batch in (1, 2, 3) if dynamic else (2,):
        x = np.random.default_rng(batch).standard_normal((batch, 7, 16)).astype(np.float32)
        expected = module(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(_run(fused_model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_run(model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_fuse_attention_leaves_masked_attention_alone(tmp_path):
    model, _ = _attention_graph(tmp_path, dynamic=False, masked=True)
    before = [n.op_type for n in model.graph.node]
    model, fused = fuse_attention(model)
    assert fused == 0 and [n.op_type for n in model.graph.node] == before
