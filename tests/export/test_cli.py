"""The rfdetr-export command: its report, the check's verdict, --trt against a fake TensorRT, and bad input."""

from __future__ import annotations

import shutil
import sys

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import fake_tensorrt  # noqa: E402  (tests/export is on sys.path)

from rfdetr_export import check, export_model  # noqa: E402
from rfdetr_export.cli import main  # noqa: E402
from rfdetr_export.onnx_export import OnnxExportResult  # noqa: E402
from rfdetr_export.runtime import OnnxRuntimeModel, RuntimeLoadError  # noqa: E402


def test_report_names_outputs_nodes_size_and_checks(export):
    done = export("seg-tiny", "--dynamic-batch")
    assert done.code == 0, done.stderr
    out = done.stdout
    assert "outputs: scores [B," in out and "labels [B," in out and "int64" in out and "masks [B," in out
    assert "opset 17, float32, deform-attn gather, dynamic batch" in out
    assert "nodes: " in out and "size: " in out and "MiB" in out
    checks = [line for line in out.splitlines() if "check batch" in line]
    assert len(checks) == 2 and "check batch 1:" in checks[0] and "check batch 3:" in checks[1]
    assert all(line.endswith(": ok") for line in checks)


@pytest.fixture
def reuse_export(monkeypatch, export):
    """Make the CLI's ONNX export step copy the session's dynamic seg-tiny export (same options) instead of
    exporting again; everything after it (TensorRT-fitness check, engine build, automatic check) runs."""
    done = export("seg-tiny", "--dynamic-batch")

    def fake_export_onnx(module, path, **kwargs):
        shutil.copy(done.path, path)
        model = onnx.load(str(path))
        return OnnxExportResult(
            path=path,
            nodes=len(model.graph.node),
            nodes_before_simplify=None,
            size_bytes=path.stat().st_size,
            opset=17,
            dynamic_batch=True,
            batch=1,
            half=False,
            sampler="gather",
            output_names=("scores", "labels", "boxes", "masks"),
        )

    monkeypatch.setattr(export_model, "export_onnx", fake_export_onnx)
    return done


def test_disagreement_beyond_tolerance_exits_1(reuse_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(check.TOLERANCES, "float32", check.Tolerance(score=-1.0, box_px=0.5, mask_iou=0.99))
    code = main([str(reuse_export.checkpoint), "--dynamic-batch", "--output", str(tmp_path / "m.onnx")])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED" in captured.out and "disagrees with PyTorch beyond the tolerances" in captured.err
    assert "Only the mask IoU is off" not in captured.err  # the scores failed


def test_a_mask_iou_only_failure_exits_1_with_the_hint(reuse_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(check.TOLERANCES, "float32", check.Tolerance(score=1e-3, box_px=0.5, mask_iou=1.01))
    code = main([str(reuse_export.checkpoint), "--dynamic-batch", "--output", str(tmp_path / "m.onnx")])
    captured = capsys.readouterr()
    assert code == 1
    assert "Only the mask IoU is off" in captured.err and "--check-images" in captured.err


def test_trt_build_with_fake_tensorrt_checks_the_engine(reuse_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    fake_tensorrt.calls.clear()
    engine = tmp_path / "tiny.engine"
    code = main(
        [
            str(reuse_export.checkpoint),
            "--trt",
            "--min-batch",
            "1",
            "--opt-batch",
            "2",
            "--max-batch",
            "4",
            "--output",
            str(engine),
            "--workspace-gb",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert (
        engine.is_file() and engine.with_suffix(".json").is_file() and engine.with_suffix(".onnx").is_file()
    )
    assert "float32 (0.0% fp16 layers), batch 1..4" in out
    assert [line for line in out.splitlines() if "check batch" in line][-1].endswith(": ok")
    assert any(
        c.startswith("set_shape images (1, 3, 160, 160) (2, 3, 160, 160) (4, 3, 160, 160)")
        for c in fake_tensorrt.calls
    )


def test_trt_refuses_gridsample_and_names_missing_extra(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main([str(checkpoints["seg-tiny"]), "--trt", "--output", str(tmp_path / "x.engine")]) == 2
    assert "rfdetr-export[trt]" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    assert main([str(checkpoints["seg-tiny"]), "--trt", "--deform-attn", "gridsample"]) == 2
    err = capsys.readouterr().err
    assert "miscompiles GridSample" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.safetensors"], "no such file, and not the name of official weights"),
        (["seg-foo"], "not the name of official weights"),
        (["{tiny}", "--opset", "12"], "--opset 12 is not supported"),
        (["{tiny}", "--output", "{file}/x.onnx"], "is a file, not a folder"),
        (["{tiny}", "--batch", "0"], "--batch must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(checkpoints, args, message, capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    args = [a.format(tiny=checkpoints["seg-tiny"], file=tmp_path / "file") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_onnx_extra_is_named(checkpoints, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main([str(checkpoints["seg-tiny"]), "--output", str(tmp_path / "x.onnx")]) == 2
    assert "rfdetr-export[onnx]" in capsys.readouterr().err


def test_corrupt_or_foreign_onnx_files_are_refused(tmp_path, export):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(RuntimeLoadError, match="is not a loadable ONNX model"):
        OnnxRuntimeModel(bad)
    with pytest.raises(RuntimeLoadError, match="ONNX file not found"):
        OnnxRuntimeModel(tmp_path / "none.onnx")
    model = onnx.load(str(export("seg-tiny", "--dynamic-batch").path))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(RuntimeLoadError, match="no rfdetr model card"):
        OnnxRuntimeModel(foreign)
