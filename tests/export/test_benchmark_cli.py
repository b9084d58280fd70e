"""`rfdetr-export benchmark`: a couple of iterations on CPU with the onnxruntime and torch backends print the
table and write the JSON with every field; bad input is one line and exit 2. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rfdetr_export.cli import main

TIMING_FIELDS = {"median_ms", "p90_ms", "images_per_s", "iters"}


def _bench(capsys, *args):
    threads = torch.get_num_threads()
    code = main(["benchmark", *map(str, args)])
    captured = capsys.readouterr()
    assert torch.get_num_threads() == threads  # --threads does not leak out of the command
    return code, captured.out, captured.err


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_benchmark_prints_the_table_and_writes_the_json(export, backend, tmp_path, capsys):
    done = export("seg-tiny", "--dynamic-batch")
    assert done.code == 0, done.stderr
    model = done.path if backend == "onnxruntime" else done.checkpoint
    out = tmp_path / "bench.json"
    code, stdout, err = _bench(capsys, model, "--backend", backend, "--batch-size", "2", "--iters", "2",
                               "--warmup", "1", "--image-size", "120x160", "--threads", "1", "--json", out)  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result == json.loads(stdout.strip().splitlines()[-1])  # the same JSON on stdout, last line
    assert result["backend"] == backend and result["variant"] == "seg-tiny" and result["batch_size"] == 2
    assert result["device"] == "cpu" and result["threads"] == 1 and result["image_size"] == [120, 160]
    assert result["resolution"] == [160, 160]
    for key in ("end_to_end", "model_only"):
        timing = result[key]
        assert set(timing) == TIMING_FIELDS and timing["iters"] == 2
        assert 0 < timing["median_ms"] <= timing["p90_ms"]
        assert timing["images_per_s"] == pytest.approx(2 / (timing["median_ms"] / 1e3))
    lines = stdout.splitlines()
    assert lines[0] == f"{backend} seg-tiny @160x160, batch 2, cpu, 1 threads, source 120x160"
    assert lines[1].split() == ["median", "ms", "p90", "ms", "images/s"]
    assert lines[2].startswith("end to end") and lines[3].startswith("model only")
    assert len(lines[2].split()) == 6 and len(lines[3].split()) == 5


def test_benchmark_bad_input_is_one_line(tmp_path, capsys):
    code, _, err = _bench(capsys, tmp_path / "missing.onnx", "--backend", "onnxruntime", "--iters", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing.onnx: no such file" in err
    code, _, err = _bench(capsys, tmp_path / "x.onnx", "--backend", "onnxruntime", "--image-size", "big")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--image-size" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_benchmark_on_cuda_without_a_gpu_says_so(export, capsys):
    done = export("seg-tiny", "--dynamic-batch")
    code, _, err = _bench(capsys, done.checkpoint, "--backend", "compile", "--device", "cuda", "--iters", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no CUDA device" in err and "--device cpu" in err


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", ["default", pytest.param("max-autotune", marks=pytest.mark.slow)])
def test_compile_backend_on_cuda_is_the_fast_path(export, tmp_path, capsys, compile_mode):
    """``--backend compile --device cuda`` times core's fast path (``RFDETR.optimize``: bf16 network, CUDA graph
    for the batch size) and reports its setup; the end-to-end path returns RLE masks on the host."""
    done = export("seg-tiny", "--dynamic-batch")
    out = tmp_path / "bench.json"
    code, stdout, err = _bench(capsys, done.checkpoint, "--backend", "compile", "--device", "cuda", "--batch-size",
                               "3", "--iters", "2", "--warmup", "1", "--compile-mode", compile_mode, "--json", out)  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    fast = result["fast_path"]
    assert fast["dtype"] == "bfloat16" and fast["batch_sizes"] == [3] and fast["setup_seconds"] > 0
    assert fast["compiled"] == (True if compile_mode == "default" else compile_mode)
    assert "CUDA fast path: bfloat16" in stdout
    assert result["model_only"]["iters"] == 2
