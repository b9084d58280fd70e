"""``rfdetr-serve --optimize``: core's GPU fast path (``RFDETR.optimize``) for a PyTorch model on CUDA.

On the CPU: ``auto`` leaves the model eager, an explicit mode says why it cannot apply, bad values are refused at
the command line, and the graph batch sizes cover every batch the batcher can form. On the GPU: a served batch
equals ``predict`` of a model optimised the same way, and ``GET /model`` reports the fast path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from serve_support import image_array

from rfdetr_serve.cli import build_parser, settings_from_args
from rfdetr_serve.inference import ImageJob, ServedModel, graph_batch_sizes
from rfdetr_serve.settings import ServeSettings


@pytest.mark.parametrize(
    "max_batch, sizes", [(1, (1,)), (2, (1, 2)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8)), (9, (1, 2, 4, 8, 9))]
)
def test_graph_batch_sizes_cover_every_batch_with_at_most_half_padding(max_batch, sizes):
    assert graph_batch_sizes(max_batch) == sizes
    for batch in range(1, max_batch + 1):
        graph = min(s for s in sizes if s >= batch)
        assert graph < 2 * batch or graph == 1


def test_every_mode_but_off_maps_to_an_optimize_call():
    from rfdetr_serve.inference import _OPTIMIZE_COMPILE
    from rfdetr_serve.settings import OPTIMIZE_MODES

    assert set(_OPTIMIZE_COMPILE) == set(OPTIMIZE_MODES) - {"off"}


def test_auto_and_off_leave_a_cpu_model_eager(local_model):
    served = ServedModel(local_model, "test")
    assert served.optimize("auto", 8) is None and served.optimize("off", 8) is None
    assert served.fast_path is None and served.card()["fast_path"] is None and served.card()["fast_path_error"] is None
    assert local_model.fast_path is None


@pytest.mark.parametrize("mode", ["graphs", "compile", "max-autotune"])
def test_an_explicit_mode_on_the_cpu_says_what_to_do(local_model, mode):
    served = ServedModel(local_model, "test")
    with pytest.raises(ValueError, match=f"--optimize {mode} needs a PyTorch model on a CUDA device") as info:
        served.optimize(mode, 8)
    assert "--optimize off" in str(info.value) and "--device cuda" in str(info.value)
    assert served.fast_path is None and local_model.fast_path is None


class _FailingCudaModel:
    """What ``ServedModel.optimize`` reads of an RFDETR on CUDA, with a capture that fails."""

    model = object()
    device = torch.device("cuda")
    runner = None

    def optimize(self, **kwargs):
        raise RuntimeError("CUDA error: out of memory")


def test_auto_stays_eager_and_says_so_when_the_capture_fails(caplog):
    served = ServedModel(_FailingCudaModel(), "test")
    with caplog.at_level("WARNING", logger="rfdetr_serve"):
        assert served.optimize("auto", 4) is None
    assert served.fast_path is None and served.fast_path_error == "RuntimeError: CUDA error: out of memory"
    assert '"event": "fast_path_failed"' in caplog.text and "--optimize off" in caplog.text
    with pytest.raises(RuntimeError, match="out of memory"):  # an explicit mode stops the server instead
        ServedModel(_FailingCudaModel(), "test").optimize("graphs", 4)


class _RecordingCudaModel:
    """An RFDETR on CUDA as far as ``ServedModel.optimize`` can tell, recording the ``optimize`` calls and
    answering ``predict`` with a real CPU model (the graphs themselves need a GPU: the GPU test below)."""

    device = torch.device("cuda")
    runner = None

    def __init__(self, inner):
        self.inner, self.model, self.calls = inner, inner.model, []

    def optimize(self, **kwargs):
        self.calls.append(kwargs)
        return {"seconds": 1.23456, "dtype": "bfloat16", "capture_seconds": {b: 0.1 for b in kwargs["batch_sizes"]}}

    def __getattr__(self, name):  # predict, variant, resolution, card, class_map: the CPU model's
        return getattr(self.inner, name)


@pytest.mark.parametrize(
    ("mode", "compile_arg", "sizes"),
    [("auto", False, (1, 2, 4, 6)), ("graphs", False, (1, 2, 4, 6)), ("compile", True, (1, 6)),
     ("max-autotune", "max-autotune", (1, 6))],
)
def test_each_mode_asks_optimize_for_its_graphs_and_the_card_reports_them(local_model, mode, compile_arg, sizes):
    model = _RecordingCudaModel(local_model)
    served = ServedModel(model, "test")
    summary = served.optimize(mode, 6)
    assert model.calls == [{"batch_sizes": sizes, "dtype": torch.bfloat16, "compile": compile_arg}]
    assert summary == {"mode": "graphs" if compile_arg is False else mode, "dtype": "bfloat16",
                       "batch_sizes": list(sizes), "setup_seconds": 1.235}
    card = served.card()
    assert card["fast_path"] == summary and card["fast_path_error"] is None and card["device"] == "cuda"
    assert len(served.run_batch([ImageJob(image_array(40, 60, seed=1), 0.0)])) == 1  # predict still answers


def test_the_flag_reaches_the_settings_and_bad_values_are_refused(capsys):
    args = build_parser().parse_args(["seg-nano", "--optimize", "compile"])
    assert settings_from_args(args).optimize == "compile"
    assert settings_from_args(build_parser().parse_args(["seg-nano"])).optimize == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["seg-nano", "--optimize", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--optimize must be one of"):
        ServeSettings(model="m", optimize="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", pytest.param("compile", marks=pytest.mark.slow)])
def test_served_batches_on_the_fast_path_equal_predict_of_the_same_model(checkpoint, mode):
    from rfdetr_core import RFDETR

    served = ServedModel(RFDETR.from_checkpoint(checkpoint, device="cuda"), "test")
    summary = served.optimize(mode, 4)
    assert summary["mode"] == ("graphs" if mode == "auto" else mode) and summary["dtype"] == "bfloat16"
    assert summary["batch_sizes"] == ([1, 2, 4] if mode == "auto" else [1, 4])
    assert served.card()["fast_path"] == summary
    images = [image_array(90 + 10 * i, 120, seed=i) for i in range(3)]  # a batch of 3: the graph of 4, padded
    got = served.run_batch([ImageJob(im, 0.0) for im in images])
    want = served.rfdetr.predict(images, threshold=0.0)
    for det, ref in zip(got, want, strict=True):
        np.testing.assert_array_equal(det.boxes, ref.boxes)
        np.testing.assert_array_equal(det.scores, ref.scores)
        assert [r["counts"] for r in det.rles] == [r["counts"] for r in ref.rles]
