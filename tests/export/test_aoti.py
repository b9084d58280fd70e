"""`rfdetr-export MODEL --aoti`: an AOTInductor package (.pt2) of seg-tiny, compiled once on the CPU (about a
minute on 2 cores), passes its automatic check, and ``RFDETR.from_file("model.pt2").predict`` gives PyTorch's
detections; a static batch is run in chunks; bad input is one line and exit 2; a file that is not a package is a
clear load error."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from rfdetr_core import RFDETR
from rfdetr_core.errors import RFDETRError
from rfdetr_export.aoti import AotiModel
from rfdetr_export.check import synthetic_images
from rfdetr_export.cli import main
from rfdetr_export.runtime import RuntimeLoadError


def _cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def package(checkpoints, tmp_path_factory):
    """``(path, checkpoint, stdout)`` of the CLI's dynamic-batch seg-tiny package, checked by the CLI itself."""
    path = tmp_path_factory.mktemp("aoti") / "tiny.pt2"
    code, out, err = _cli(checkpoints["seg-tiny"], "--aoti", "--dynamic-batch", "--output", path)
    assert code == 0, err
    return path, checkpoints["seg-tiny"], out


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.slow
def test_aoti_export_reports_and_passes_its_check(package):
    path, _, out = package
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))  # written atomically, nothing left over
    lines = out.splitlines()
    assert any("AOTInductor, cpu, float32" in line and "dynamic batch" in line for line in lines)
    checks = [line for line in lines if line.strip().startswith("check batch")]
    assert len(checks) == 2 and all(line.endswith(": ok") for line in checks)  # batch 1 and 3


@pytest.mark.slow
def test_from_file_pt2_predict_equals_pytorch_predict(package):
    path, checkpoint, _ = package
    aoti = RFDETR.from_file(path)
    eager = RFDETR.from_file(checkpoint, device="cpu")
    assert aoti.runner.backend == "aoti" and aoti.runner.device == torch.device("cpu")
    assert aoti.class_names == eager.class_names and aoti.resolution == eager.resolution
    images = synthetic_images(3, size=(200, 260), seed=5)
    got = aoti.predict(images, threshold=0.0, batch_size=2)  # batches of 2 and 1 through one package
    want = eager.predict(images, threshold=0.0, batch_size=2)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w) > 0
        np.testing.assert_array_equal(g.category_ids, w.category_ids)
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g.boxes, w.boxes, atol=0.1, rtol=0)
        assert min(_mask_iou(a, b) for a, b in zip(g.masks, w.masks, strict=True)) >= 0.99


@pytest.mark.slow
def test_static_batch_is_run_in_padded_chunks(package):
    """A package of static batch N runs any B as chunks of N, the last padded; the padding never shows."""
    path, _, _ = package
    runner = AotiModel(path)
    assert runner.static_batch is None  # the dynamic package
    h, w = runner.card.resolution
    images = torch.randn(5, 3, h, w, generator=torch.Generator().manual_seed(0))
    whole = runner(images)
    runner.static_batch = 2  # as a --batch 2 package would be run: chunks of 2, 2 and 1 (+1 padding row)
    chunked = runner(images)
    for a, b in zip(chunked, whole, strict=True):
        assert a.shape == b.shape and a.shape[0] == 5
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_package_carries_the_card_and_how_it_was_made(package):
    path, checkpoint, _ = package
    runner = AotiModel(path)
    assert runner.card.to_metadata() == RFDETR.from_file(checkpoint, device="cpu").card.to_metadata()
    info = runner.export_info
    assert info["format"] == "aoti" and info["dynamic_batch"] is True and info["torch"] == torch.__version__
    assert json.dumps(info)  # JSON-safe


def test_aoti_bad_options_are_one_line(checkpoints, tmp_path):
    for flags, words in (
        (["--half"], "--aoti does not take --half"),
        (["--int8"], "--aoti does not take --int8"),
        (["--raw"], "--aoti does not take --raw"),
        (["--output", tmp_path / "model.onnx"], "must end in .pt2"),
    ):
        code, _, err = _cli(checkpoints["seg-tiny"], "--aoti", *flags)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (flags, err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_file_that_is_not_a_package_is_a_load_error(tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(RuntimeLoadError, match="cannot be loaded as an AOTInductor package"):
        RFDETR.from_file(bad)
    with pytest.raises(RFDETRError, match="not found"):
        AotiModel(tmp_path / "missing.pt2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(checkpoints, tmp_path):
    code, _, err = _cli(checkpoints["seg-tiny"], "--aoti", "--device", "cuda", "--output", tmp_path / "m.pt2")
    assert code == 2 and "no CUDA device here" in err


def test_an_unwritable_output_fails_before_compiling(checkpoints, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _cli(checkpoints["seg-tiny"], "--aoti", "--output", blocker / "model.pt2")
    assert code == 2 and "is a file, not a folder" in err and "compiling seg-tiny" not in err


def test_a_cuda_package_is_a_clear_load_error_without_the_opt_in(package, tmp_path, monkeypatch):
    """CUDA packages are refused until a GPU run shows them loading (one crashed the process on an H200): the
    runner says so in one line, before torch's loader runs. The package here is the CPU one with its device
    entry rewritten to cuda."""
    import zipfile

    from rfdetr_core import aot_package

    monkeypatch.delenv(aot_package.CUDA_OPT_IN, raising=False)
    path, _, _ = package
    cuda_copy = tmp_path / "cuda.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(cuda_copy, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("wrapper_metadata.json"):
                meta = json.loads(data)
                meta[aot_package.AOTI_DEVICE_KEY] = "cuda"
                data = json.dumps(meta).encode()
            dst.writestr(item, data)
    assert aot_package.package_device_type(path) == "cpu"
    with pytest.raises(RuntimeLoadError, match="cuda.pt2: AOTInductor packages for CUDA are disabled"):
        AotiModel(cuda_copy)
