"""torch.ops.rfdetr.ms_deform_attn on CPU: the pure-PyTorch path against a naive loop, and the backend choice.

The CUDA kernel's own tests are in test_deform_attn_cuda.py (marker ``gpu``).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import rfdetr_core  # noqa: F401  (registers torch.ops.rfdetr.*)
from rfdetr_core import ops
from rfdetr_core.errors import RFDETRError
from rfdetr_core.ops import cuda_ext


def naive_ms_deform_attn(value, spatial_shapes, loc, attn):
    """Loop-by-loop float64 reference: bilinear, zero padding, pixel centres at (i + 0.5) / size."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = loc.shape
    out = torch.zeros(batch, queries, heads, dim, dtype=torch.float64)
    starts = [0]
    for lvl in range(levels):
        starts.append(starts[-1] + spatial_shapes[2 * lvl] * spatial_shapes[2 * lvl + 1])
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl in range(levels):
                    h, w = spatial_shapes[2 * lvl], spatial_shapes[2 * lvl + 1]
                    for p in range(points):
                        x = float(loc[b, q, m, lvl, p, 0]) * w - 0.5
                        y = float(loc[b, q, m, lvl, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(dim, dtype=torch.float64)
                        for yy, xx, wt in (
                            (y0, x0, (1 - (y - y0)) * (1 - (x - x0))),
                            (y0, x0 + 1, (1 - (y - y0)) * (x - x0)),
                            (y0 + 1, x0, (y - y0) * (1 - (x - x0))),
                            (y0 + 1, x0 + 1, (y - y0) * (x - x0)),
                        ):
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += wt * value[b, starts[lvl] + yy * w + xx, m].double()
                        out[b, q, m] += float(attn[b, q, m, lvl, p]) * sample
    return out.view(batch, queries, heads * dim)


def _inputs(shapes, batch=2, queries=5, heads=3, dim=4, points=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = len(shapes) // 2
    s = sum(shapes[2 * i] * shapes[2 * i + 1] for i in range(levels))
    value = torch.randn(batch, s, heads, dim, generator=g, dtype=dtype)
    # [-0.2, 1.2]: some points fall partly or wholly outside the map
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    attn = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=dtype)
    return value, loc, attn


@pytest.mark.parametrize("shapes", [[5, 7], [5, 7, 3, 2, 1, 1, 4, 3]], ids=["1-level", "4-levels-odd"])
def test_pytorch_path_matches_naive_loops(shapes):
    value, loc, attn = _inputs(shapes)
    out = torch.ops.rfdetr.ms_deform_attn(value, shapes, loc, attn)
    ref = naive_ms_deform_attn(value, shapes, loc, attn)
    assert out.shape == (2, 5, 12)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_points_far_outside_read_zeros():
    value, loc, attn = _inputs([4, 4], queries=2)
    loc[:, 0] = -0.5
    loc[:, 1] = 1.6
    out = torch.ops.rfdetr.ms_deform_attn(value, [4, 4], loc, attn)
    assert torch.equal(out, torch.zeros_like(out))


def test_mixed_dtypes_are_promoted():
    value, loc, attn = _inputs([3, 4], dtype=torch.float32)
    out = torch.ops.rfdetr.ms_deform_attn(value.half().float(), [3, 4], loc.double(), attn)
    assert out.dtype == torch.float64
    ref = naive_ms_deform_attn(value.half().float(), [3, 4], loc.double(), attn)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# 16-bit inputs on CPU. B == 1 makes the per-level value view non-contiguous (W stride M*D = 256 here), and a
# 20x22 level puts most reads past offset 2**15, where torch's 16-bit CPU grid_sample returned garbage/NaN.
# Reference: the float64 loops on the same (rounded) inputs; tolerance a few units in the last place.
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)], ids=["bf16", "f16"]
)
@pytest.mark.parametrize("batch", [1, 2])
def test_16bit_cpu_inputs_match_float64(dtype, tol, batch):
    shapes = [20, 22, 3, 4]
    value, loc, attn = _inputs(shapes, batch=batch, queries=4, heads=2, dim=128, dtype=torch.float32, seed=5)
    value, loc, attn = value.to(dtype), loc.to(dtype), attn.to(dtype)
    out = torch.ops.rfdetr.ms_deform_attn(value, shapes, loc, attn)
    assert out.dtype == dtype and out.shape == (batch, 4, 256)
    ref = naive_ms_deform_attn(value, shapes, loc, attn)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_op_has_gradients_on_cpu():
    value, loc, attn = _inputs([3, 4], batch=1, queries=2, heads=2, dim=2)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, lo, a: torch.ops.rfdetr.ms_deform_attn(v, [3, 4], lo, a), (value, loc, attn)
    )


# --- backend choice ----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_state(monkeypatch):
    """Each test starts with no build attempt recorded; a loaded library (GPU machine) is kept."""
    loaded = cuda_ext.kernel_loaded()
    cuda_ext.reset_for_tests()
    yield
    if not loaded:
        cuda_ext.reset_for_tests()


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, "auto"), ("", "auto"), ("CUDA", "cuda"), (" pytorch ", "pytorch")]
)
def test_requested_backend_reads_env(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(ops.BACKEND_ENV, raw)
    assert ops.requested_backend() == expected


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    with pytest.raises(RFDETRError, match="RFDETR_DEFORM_ATTN='triton' is not one of auto, cuda, pytorch"):
        ops.requested_backend()


def test_pytorch_backend_never_builds(monkeypatch, fresh_state):
    monkeypatch.setenv(ops.BACKEND_ENV, "pytorch")
    monkeypatch.setattr(cuda_ext, "_build_and_load", lambda: pytest.fail("must not build"))
    monkeypatch.setattr(cuda_ext, "_why_impossible", lambda: None)
    assert cuda_ext.use_cuda_kernel() is False


def test_auto_without_buildable_kernel_logs_one_line_and_falls_back(monkeypatch, caplog, fresh_state):
    if cuda_ext.kernel_loaded():
        pytest.skip("the CUDA extension is already loaded in this process")
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    monkeypatch.setattr(
        cuda_ext, "_why_impossible", lambda: "no CUDA compiler (nvcc) was found; set CUDA_HOME"
    )
    with caplog.at_level(logging.WARNING, logger="rfdetr_core.ops"):
        assert cuda_ext.use_cuda_kernel() is False
        assert cuda_ext.use_cuda_kernel() is False  # decided once: no second attempt, no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "rfdetr_core.ops"]
    assert len(lines) == 1
    assert "no CUDA compiler" in lines[0] and "pure-PyTorch" in lines[0]


def test_auto_with_failing_compiler_falls_back(monkeypatch, caplog, fresh_state):
    if cuda_ext.kernel_loaded():
        pytest.skip("the CUDA extension is already loaded in this process")
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    monkeypatch.setattr(cuda_ext, "_why_impossible", lambda: None)

    def broken_build():
        raise RuntimeError("Error building extension 'rfdetr_ms_deform_attn'\nnvcc fatal: ...")

    monkeypatch.setattr(cuda_ext, "_build_and_load", broken_build)
    with caplog.at_level(logging.WARNING, logger="rfdetr_core.ops"):
        assert cuda_ext.use_cuda_kernel() is False
    (line,) = [r.getMessage() for r in caplog.records if r.name == "rfdetr_core.ops"]
    assert "Error building extension" in line and "\n" not in line


def test_cuda_backend_that_cannot_build_is_an_error(monkeypatch, fresh_state):
    if cuda_ext.kernel_loaded():
        pytest.skip("the CUDA extension is already loaded in this process")
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda")
    monkeypatch.setattr(cuda_ext, "_why_impossible", lambda: "ninja is not installed (pip install ninja)")
    with pytest.raises(ops.KernelBuildError, match="RFDETR_DEFORM_ATTN=cuda.*ninja is not installed"):
        cuda_ext.use_cuda_kernel()
    with pytest.raises(ops.KernelBuildError):
        ops.deform_attn_backend()


def test_auto_after_failed_cuda_attempt_still_logs_its_line(monkeypatch, caplog, fresh_state):
    if cuda_ext.kernel_loaded():
        pytest.skip("the CUDA extension is already loaded in this process")
    monkeypatch.setattr(cuda_ext, "_why_impossible", lambda: "no CUDA device is visible")
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda")
    with pytest.raises(ops.KernelBuildError):
        cuda_ext.use_cuda_kernel()
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    with caplog.at_level(logging.WARNING, logger="rfdetr_core.ops"):
        assert cuda_ext.use_cuda_kernel() is False
    assert [r.getMessage() for r in caplog.records if r.name == "rfdetr_core.ops"][0].startswith(
        "CUDA deformable attention unavailable: no CUDA device is visible"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cpu_machine_reports_pytorch_and_cuda_is_an_error(monkeypatch, fresh_state):
    monkeypatch.setenv(ops.BACKEND_ENV, "auto")
    assert ops.deform_attn_backend() == "pytorch"
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda")
    with pytest.raises(ops.KernelBuildError, match="no CUDA device|not a CUDA build"):
        ops.deform_attn_backend()


def test_cpu_tensors_take_pytorch_path_whatever_the_backend(monkeypatch, fresh_state):
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda")
    monkeypatch.setattr(cuda_ext, "_build_and_load", lambda: pytest.fail("must not build for CPU tensors"))
    value, loc, attn = _inputs([3, 4])
    out = torch.ops.rfdetr.ms_deform_attn(value, [3, 4], loc, attn)
    torch.testing.assert_close(out, ops.ms_deform_attn_pytorch(value, [3, 4], loc, attn), rtol=0, atol=0)


def test_build_dir_follows_home_and_arch_list(monkeypatch, tmp_path):
    monkeypatch.setenv("RFDETR_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    path = cuda_ext.build_dir()
    assert path.parent == tmp_path / "extensions"
    assert path.name.startswith(torch.__version__ + "-cuda")
    assert path.name.endswith("-sm80_sm90ptx")


def test_sources_found_in_checkout():
    src = cuda_ext.source_dir()
    assert src is not None
    assert {p.name for p in src.iterdir()} >= set(cuda_ext.SOURCES + cuda_ext.HEADERS)


@pytest.mark.parametrize(
    ("shapes", "mutate", "message"),
    [
        ([3, 4], lambda v, lo, a: (v, lo, a), None),
        ([3, 5], lambda v, lo, a: (v, lo, a), "spatial_shapes cover 15 positions but value has S = 12"),
        ([3], lambda v, lo, a: (v, lo, a), "1 to 16 \\(H, W\\) pairs"),
        ([3, 4, 0, 2], lambda v, lo, a: (v, lo, a), "has 1 levels but spatial_shapes has 2"),
        ([3, 4], lambda v, lo, a: (v[0], lo, a), "value must be \\[B, S, M, D\\]"),
        ([3, 4], lambda v, lo, a: (v, lo[..., :1], a), "sampling_locations must be"),
        ([3, 4], lambda v, lo, a: (v, lo, a[:, :2]), "attention_weights \\(2, 2, 3, 1, 2\\) must be"),
        ([3, 4], lambda v, lo, a: (v[:1], lo, a), "disagree on batch or heads"),
    ],
)
def test_kernel_input_checks(shapes, mutate, message):
    value, loc, attn = mutate(*_inputs([3, 4]))
    if message is None:
        cuda_ext.check_kernel_inputs(value, shapes, loc, attn)
    else:
        with pytest.raises(ValueError, match=message):
            cuda_ext.check_kernel_inputs(value, shapes, loc, attn)


def test_gather_sampler_exports_without_tensor_literals():
    """torch 2.11's ONNX exporter failed on the gather sampler while its constants were tensor literals made in
    ``forward`` ("Constant tensor ...lifted_tensor_0 is not in the constants dictionary", 2026-12-04); they are
    built by ops now, so ``torch.export`` lifts none."""
    from rfdetr_core.ops.deform_attn import ms_deform_attn_gather

    class Sampler(torch.nn.Module):
        def forward(self, value, locations, weights):
            return ms_deform_attn_gather(value, [4, 4, 2, 2], locations, weights)

    value = torch.randn(1, 20, 2, 4)  # [B, S, M, D], S = 4*4 + 2*2
    locations, weights = torch.rand(1, 3, 2, 2, 2, 2), torch.rand(1, 3, 2, 2, 2)  # [B, Q, M, L, P, (2)]
    program = torch.export.export(Sampler(), (value, locations, weights))
    assert not program.constants
    torch.testing.assert_close(program.module()(value, locations, weights), Sampler()(value, locations, weights))
