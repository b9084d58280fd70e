"""ONNX export end to end (CPU, ONNX Runtime): graphs, batches, equality with PyTorch, card, fp16, --raw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from rfdetr_core.deploy import DeployModel  # noqa: E402
from rfdetr_core.factory import load_model  # noqa: E402
from rfdetr_core.model_card import ModelCard  # noqa: E402
from rfdetr_core.preprocess import preprocess  # noqa: E402
from rfdetr_export.check import TOLERANCES, compare_outputs, decoded_raw, synthetic_images  # noqa: E402
from rfdetr_export.onnx_export import read_metadata  # noqa: E402
from rfdetr_export.runtime import OnnxRuntimeModel  # noqa: E402
from rfdetr_export.trt_graph import trt_graph_problems  # noqa: E402

# seg-nano's random heads saturate dozens of float32 scores to 1.0 (and ulps below): the check pairs tied
# detections tie-aware (rfdetr_export.check; tests/export/test_check_pairing.py).
VARIANTS = ["seg-tiny", pytest.param("seg-nano", marks=pytest.mark.slow)]


def _reference(checkpoint, raw=False):
    loaded = load_model(None, None, checkpoint)
    return DeployModel(loaded.model, loaded.card, postprocess=not raw).eval(), loaded.card


def _batch(card, n, seed=0):
    return preprocess(synthetic_images(n, seed=seed), card.resolution, card.preprocess)


def _assert_same(runner, reference, card, batch, tolerance=TOLERANCES["float32"]):
    x, sizes = _batch(card, batch, seed=batch)
    with torch.inference_mode():
        want = reference(x)
    got = runner(x)
    result = compare_outputs(got, want, sizes, tolerance)
    assert result.ok, result.line()
    return got


@pytest.mark.parametrize("variant", VARIANTS)
def test_dynamic_batch_graph_equals_pytorch_at_batches_1_2_3_8(export, variant):
    done = export(variant, "--dynamic-batch")
    assert done.code == 0, done.stderr
    runner = OnnxRuntimeModel(done.path)
    reference, card = _reference(done.checkpoint)
    assert runner.static_batch is None and runner.output_names == ("scores", "labels", "boxes", "masks")
    inputs = runner.session.get_inputs()
    assert (
        inputs[0].name == "images"
        and inputs[0].type == "tensor(float)"
        and inputs[0].shape[1:] == [3, *card.resolution]
    )
    k = reference.num_select
    h, w = card.mask_size
    for batch in (1, 2, 3, 8):
        scores, labels, boxes, masks = _assert_same(runner, reference, card, batch)
        assert scores.shape == (batch, k) and scores.dtype == torch.float32
        assert labels.shape == (batch, k) and labels.dtype == torch.int64
        assert boxes.shape == (batch, k, 4) and float(boxes.min()) >= 0 and float(boxes.max()) <= 1
        assert masks.shape == (batch, k, h, w)
    # a graph for TensorRT: no GridSample, only parser-supported ops, no ScatterND-built shapes
    assert trt_graph_problems(onnx.load(str(done.path))) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_static_batch_graph_takes_any_batch_in_chunks(export, variant):
    done = export(variant, "--batch", "2")
    assert done.code == 0, done.stderr
    runner = OnnxRuntimeModel(done.path)
    reference, card = _reference(done.checkpoint)
    assert runner.static_batch == 2
    assert runner.session.get_outputs()[0].shape == [2, reference.num_select]
    for batch in (1, 2, 3, 8):  # 1 and 3 are padded, 8 is four runs
        _assert_same(runner, reference, card, batch)


def test_card_and_export_facts_round_trip(export):
    done = export("seg-tiny", "--dynamic-batch")
    card_meta, info = read_metadata(onnx.load(str(done.path)))
    _, card = _reference(done.checkpoint)
    assert ModelCard.from_metadata(card_meta) == card
    assert OnnxRuntimeModel(done.path).card == card
    assert info["opset"] == 17 and info["dynamic_batch"] is True and info["deform_attn"] == "gather"
    assert info["outputs"] == ["scores", "labels", "boxes", "masks"] and info["rfdetr_core"] and info["torch"]
    model = onnx.load(str(done.path))
    assert [o.version for o in model.opset_import if o.domain == ""] == [17]
    onnx.checker.check_model(model, full_check=True)


def test_raw_graph_equals_pytorch_raw_outputs(export):
    done = export("seg-tiny", "--raw", "--dynamic-batch")
    assert done.code == 0, done.stderr
    runner = OnnxRuntimeModel(done.path)
    reference, card = _reference(done.checkpoint, raw=True)
    assert runner.output_names == ("pred_logits", "pred_boxes", "pred_masks")
    for batch in (1, 3):
        x, sizes = _batch(card, batch)
        with torch.inference_mode():
            want = reference(x)
        got = runner.run(x)
        for g, w, atol in zip(got, want, (1e-4, 1e-5, 1e-3), strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g.numpy(), w.numpy(), atol=atol, rtol=0)
        result = compare_outputs(
            decoded_raw(runner.run, card)(x), decoded_raw(reference, card)(x), sizes, TOLERANCES["float32"]
        )
        assert result.ok, result.line()
    with pytest.raises(Exception, match="--raw graph"):
        runner(x)


def test_half_graph_is_fp16_with_float32_islands(export):
    """Structure of the --half graph: float32 boundary, LayerNorm/Softmax in float32, most compute in fp16, and
    it runs at batches 1 and 3. Its numbers are in test_half_numbers.py (given float32's two-stage proposals:
    on random weights the fp16 backbone swaps near-tied proposals, and with them whole queries)."""
    done = export("seg-tiny", "--half", "--dynamic-batch", "--no-check")
    assert done.code == 0, done.stdout + done.stderr
    assert "fp16 nodes:" in done.stdout
    model = onnx.load(str(done.path))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in inferred.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(
        o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for o in model.graph.output
    )
    matmuls = [n for n in inferred.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert sum(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in matmuls) > 0.7 * len(matmuls)
    runner = OnnxRuntimeModel(done.path)
    _, card = _reference(done.checkpoint)
    for batch in (1, 3):
        x, _ = _batch(card, batch)
        scores, labels, boxes, masks = runner(x)
        assert scores.shape[0] == batch and bool(torch.isfinite(scores).all()) and bool(torch.isfinite(masks).all())
