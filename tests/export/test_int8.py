"""``rfdetr-export --onnx --int8``: the quantized graph (every linear layer int8, contract and card unchanged,
dynamic batch intact), its numbers against PyTorch float32 given the same two-stage proposals, the check's
``min_score`` cut, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rfdetr_core import RFDETR  # noqa: E402
from rfdetr_core.factory import load_model  # noqa: E402
from rfdetr_core.preprocess import preprocess  # noqa: E402
from rfdetr_core.variants import get_variant  # noqa: E402
from rfdetr_export.check import TOLERANCES, Tolerance, compare_outputs, synthetic_images  # noqa: E402
from rfdetr_export.cli import main  # noqa: E402
from rfdetr_export.export_model import deploy_for  # noqa: E402
from rfdetr_export.int8 import constant_weight_matmuls  # noqa: E402
from rfdetr_export.onnx_export import METADATA_CARD, METADATA_EXPORT, export_onnx  # noqa: E402
from rfdetr_export.runtime import OnnxRuntimeModel  # noqa: E402


def test_int8_graph_quantizes_every_linear_layer_and_keeps_the_contract(export):
    float32 = export("seg-tiny", "--dynamic-batch", "--no-check")
    done = export("seg-tiny", "--dynamic-batch", "--int8", "--no-check")
    assert done.code == 0, done.stderr
    assert "opset 17, int8, deform-attn gather, dynamic batch" in done.stdout
    assert "int8: " in done.stdout and " MatMuls (those with a constant weight); weights " in done.stdout
    model = onnx.load(str(done.path))
    onnx.checker.check_model(model, full_check=True)
    # no float MatMul with a constant 2-d weight is left; each became a MatMulInteger
    assert constant_weight_matmuls(model) == []
    quantized = sum(1 for n in model.graph.node if n.op_type == "MatMulInteger")
    assert quantized > 40 and f"int8: {quantized} of " in done.stdout
    # the backbone's exact GELUs are one ONNX Runtime node each, no Erf left
    gelus = sum(1 for n in model.graph.node if n.op_type == "Gelu" and n.domain == "com.microsoft")
    attentions = sum(1 for n in model.graph.node if n.op_type == "MultiHeadAttention")
    assert gelus > 0 and f"; {gelus} GELUs and {attentions} attentions fused" in done.stdout
    assert not any(n.op_type == "Erf" for n in model.graph.node)
    # the backbone's self-attentions are one ONNX Runtime node each (one per encoder block)
    assert attentions == get_variant("seg-tiny").encoder_depth
    assert done.path.stat().st_size < 0.5 * float32.path.stat().st_size
    props = {p.key: p.value for p in model.metadata_props}
    reference = onnx.load(str(float32.path))
    assert props[METADATA_CARD] == {p.key: p.value for p in reference.metadata_props}[METADATA_CARD]
    assert json.loads(props[METADATA_EXPORT])["int8"] is True
    assert [o.name for o in model.graph.output] == ["scores", "labels", "boxes", "masks"]


def test_int8_graph_runs_at_every_batch_size_through_predict(export):
    done = export("seg-tiny", "--dynamic-batch", "--int8", "--no-check")
    runner = OnnxRuntimeModel(done.path)
    card = runner.card
    h, w = card.mask_size
    for batch in (1, 2, 3, 8):
        x = torch.randn(batch, 3, *card.resolution, generator=torch.Generator().manual_seed(batch))
        scores, labels, boxes, masks = runner(x)
        k = card.default_num_select
        assert scores.shape == (batch, k) and labels.shape == (batch, k) and boxes.shape == (batch, k, 4)
        assert masks.shape == (batch, k, h, w) and masks.dtype == torch.float32
        assert torch.isfinite(scores).all() and torch.isfinite(masks).all()
    model = RFDETR.from_file(done.path)
    dets = model.predict(synthetic_images(2), threshold=0.0)
    assert len(dets) == 2 and all(d.masks.shape == (len(d), 360, 480) for d in dets)


def test_int8_results_of_an_image_do_not_depend_on_its_batch(export):
    """Activation ranges are per tensor, so one session.run over a batch couples its images; the runner runs a
    dynamic int8 graph image by image, and an image gets the same detections in any batch."""
    import numpy as np

    done = export("seg-tiny", "--dynamic-batch", "--int8", "--no-check")
    runner = OnnxRuntimeModel(done.path)
    x = torch.randn(3, 3, *runner.card.resolution, generator=torch.Generator().manual_seed(5))
    x[2] *= 3  # a batch-mate with a wider range
    together = runner(x)
    for i in range(3):
        alone = runner(x[i : i + 1])
        assert all(torch.equal(t[i], a[0]) for t, a in zip(together, alone, strict=True))
    # what the runner avoids: the same graph run over the whole batch at once gives image 0 other numbers
    batched = runner.session.run(["scores"], {"images": x.numpy()})[0]
    assert not np.array_equal(batched[0], together[0][0].numpy())


@pytest.fixture(scope="module")
def moving_boxes(checkpoints, tmp_path_factory):
    """The session's seg-tiny checkpoint with the box head's zero-initialised last layer made random, so boxes
    move away from their proposals and the box error measures something."""
    from rfdetr_core.checkpoint import save_model

    loaded = load_model(None, None, checkpoints["seg-tiny"])
    last = loaded.model.bbox_embed.layers[-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
    return save_model(
        tmp_path_factory.mktemp("int8") / "tiny_boxes.safetensors", loaded.model.state_dict(), loaded.card
    )


@pytest.mark.parametrize("batch", [1, 3])
def test_int8_numbers_given_the_same_proposals(moving_boxes, tmp_path, batch):
    """Everything after the two-stage choice (as for --half in test_half_numbers.py): the int8 graph with
    float32's proposals fixed, against PyTorch float32, on every one of the K detections (no ``min_score``).

    Box and mask tolerances are the int8 check's; the score bound is 0.1, not its 0.05: these random class
    heads (weights of std 0.5, logits of std ~5) magnify int8's error, measured up to 0.045 (onnxruntime 1.32,
    a 2-core Xeon); on the CPU demo's trained seg-tiny the check's confident detections were within 0.021, box
    0.77 px, mask IoU 0.964 (docs/benchmarks.md)."""
    loaded = load_model(None, None, moving_boxes)
    module, reference, card, names = deploy_for(loaded, raw=False, num_select=None)
    x, sizes = preprocess(synthetic_images(batch, seed=batch), card.resolution, card.preprocess)
    with torch.inference_mode():
        _, memory, shapes = reference.net.features(x, reference.pos_table, check=False)
        selection = reference.net.query_selection
        k = min(selection.num_queries, memory.shape[1])
        cells = selection.scores(memory, shapes).topk(k, dim=1).indices  # [B, k] float32's choice
        want = reference(x)
    with selection.fixed_selection(cells):
        result = export_onnx(
            module, tmp_path / "int8_fixed.onnx", resolution=card.resolution, output_names=names,
            card_metadata=card.to_metadata(), batch=batch, int8=True,
        )  # fmt: skip
    assert result.int8 is not None and result.int8.quantized > 40
    got = OnnxRuntimeModel(result.path)(x)
    int8 = TOLERANCES["int8"]
    check = compare_outputs(got, want, sizes, Tolerance(0.1, int8.box_px, int8.mask_iou))
    assert check.ok and check.unmatched == 0, check.line()
    # and int8 is not float32: scores and boxes did move
    assert check.score_error > 1e-4 and check.box_error_px > 1e-3, check.line()


def test_int8_and_half_exclude_each_other(checkpoints, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(checkpoints["seg-tiny"]), "--onnx", "--int8", "--half"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_trt_int8_is_refused_with_the_alternatives(checkpoints, capsys):
    # refused before TensorRT is even looked for (none is installed here)
    code = main([str(checkpoints["seg-tiny"]), "--trt", "--int8"])
    err = capsys.readouterr().err
    assert code == 2 and "--int8 is for ONNX Runtime" in err and "--trt --half" in err

