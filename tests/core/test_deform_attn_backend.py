"""The gather sampler against grid_sample, and ``rfdetr_core.ops.use_backend`` (CPU; one GPU test, marker gpu)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import rfdetr_core  # noqa: F401  (registers torch.ops.rfdetr.*)
from rfdetr_core import ops
from rfdetr_core.errors import RFDETRError
from rfdetr_core.ops import cuda_ext

SHAPES = {"1-level": [5, 7], "4-levels-odd": [5, 7, 3, 2, 1, 1, 4, 3]}


def _inputs(shapes, batch=2, queries=6, heads=3, dim=4, points=3, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    levels = len(shapes) // 2
    s = sum(shapes[2 * i] * shapes[2 * i + 1] for i in range(levels))
    value = torch.randn(batch, s, heads, dim, generator=g, dtype=dtype)
    # [-0.3, 1.3]: points partly or wholly outside the map, some far outside
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    loc[:, 0, 0, :, 0] = torch.tensor([-0.9, 1.7], dtype=dtype)
    attn = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=dtype)
    return value.to(device), loc.to(device), attn.to(device)


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_gather_equals_grid_sample_float32(shapes):
    value, loc, attn = _inputs(shapes, seed=1)
    out = ops.ms_deform_attn_gather(value, shapes, loc, attn)
    ref = ops.ms_deform_attn_pytorch(value, shapes, loc, attn)
    assert out.shape == ref.shape == (2, 6, 12) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-5


def test_gather_equals_grid_sample_float64_exactly_enough():
    shapes = SHAPES["4-levels-odd"]
    value, loc, attn = _inputs(shapes, dtype=torch.float64, seed=2)
    out = ops.ms_deform_attn_gather(value, shapes, loc, attn)
    torch.testing.assert_close(
        out, ops.ms_deform_attn_pytorch(value, shapes, loc, attn), rtol=1e-12, atol=1e-12
    )


def test_gather_tap_on_pixel_centres_and_edges():
    """Points exactly on pixel centres read that pixel; half a pixel outside the map reads half of the edge."""
    value = torch.arange(12, dtype=torch.float32).view(1, 12, 1, 1)  # one 3x4 map, one head, one channel
    centres = torch.tensor([[(0.5 / 4, 0.5 / 3)], [(3.5 / 4, 2.5 / 3)], [(0.0, 0.5 / 3)]])  # [Q=3, P=1, 2]
    loc = centres.view(1, 3, 1, 1, 1, 2)
    attn = torch.ones(1, 3, 1, 1, 1)
    out = ops.ms_deform_attn_gather(value, [3, 4], loc, attn).flatten()
    torch.testing.assert_close(out, torch.tensor([0.0, 11.0, 0.0]))  # pixel (0,0); pixel (2,3); 0.5 * 0 + 0
    value = value + 1
    out = ops.ms_deform_attn_gather(value, [3, 4], loc, attn).flatten()
    torch.testing.assert_close(out, torch.tensor([1.0, 12.0, 0.5]))


def test_gather_half_inputs_keep_float32_coordinates():
    shapes = [40, 60]  # wide enough that fp16 pixel coordinates would round to the wrong tap
    value, loc, attn = _inputs(shapes, seed=3)
    out = ops.ms_deform_attn_gather(value.half(), shapes, loc.half(), attn.half())
    ref = ops.ms_deform_attn_pytorch(value.half().float(), shapes, loc.half().float(), attn.half().float())
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max() < 1e-2


def test_gather_has_gradients():
    shapes = [3, 4]
    value, loc, attn = _inputs(shapes, batch=1, queries=2, heads=2, dim=2, points=2, dtype=torch.float64)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ops.ms_deform_attn_gather(v, shapes, lo, a), (value, loc, attn)
    )


def test_gather_trace_keeps_batch_symbolic():
    """Traced at batch 2, run at batch 3 and 1: a baked batch would fail in a reshape or mix the images up."""
    shapes = SHAPES["4-levels-odd"]
    value, loc, attn = _inputs(shapes, batch=2)
    with torch.no_grad():
        traced = torch.jit.trace(
            lambda v, lo, a: ops.ms_deform_attn_gather(v, shapes, lo, a), (value, loc, attn)
        )
        for batch in (3, 1):
            v3, l3, a3 = _inputs(shapes, batch=batch, seed=5)
            torch.testing.assert_close(
                traced(v3, l3, a3), ops.ms_deform_attn_pytorch(v3, shapes, l3, a3), atol=1e-5, rtol=0
            )


# --- use_backend ---------------------------------------------------------------------------------------------


def _traced_ops(shapes=(3, 4)):
    """The aten ops ``torch.ops.rfdetr.ms_deform_attn`` decomposes into under the backend in force."""
    value, loc, attn = _inputs(list(shapes), batch=1)
    graph = make_fx(lambda v, lo, a: torch.ops.rfdetr.ms_deform_attn(v, list(shapes), lo, a))(
        value, loc, attn
    )
    return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}


def test_use_backend_gather_routes_the_op_and_restores(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    assert any("grid_sampler" in op for op in _traced_ops())
    with ops.use_backend("gather") as name:
        assert name == "gather" and ops.requested_backend() == "gather"
        assert ops.deform_attn_backend() == "gather"
        traced = _traced_ops()
        assert not any("grid_sampler" in op for op in traced) and any("index_select" in op for op in traced)
        with ops.use_backend("pytorch"):  # nests
            assert any("grid_sampler" in op for op in _traced_ops())
        assert ops.requested_backend() == "gather"
    assert ops.requested_backend() == "auto"
    with pytest.raises(KeyError), ops.use_backend("gather"):
        raise KeyError("boom")
    assert ops.requested_backend() == "auto"  # restored after an exception too


def test_use_backend_overrides_env_and_env_accepts_gather(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "gather")
    assert ops.requested_backend() == "gather"
    value, loc, attn = _inputs([3, 4])
    torch.testing.assert_close(
        torch.ops.rfdetr.ms_deform_attn(value, [3, 4], loc, attn),
        ops.ms_deform_attn_gather(value, [3, 4], loc, attn),
        rtol=0,
        atol=0,
    )
    with ops.use_backend("pytorch"):
        assert ops.requested_backend() == "pytorch"
        assert any("grid_sampler" in op for op in _traced_ops())


def test_use_backend_is_per_thread(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    entered, release, seen = threading.Event(), threading.Event(), {}

    def other():
        with ops.use_backend("gather"):
            entered.set()
            release.wait(5)
            seen["other"] = ops.requested_backend()

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(5)
    seen["main"] = ops.requested_backend()  # while the other thread is inside its block
    release.set()
    thread.join(5)
    assert seen == {"main": "auto", "other": "gather"}


def test_use_backend_unknown_name_is_a_clear_error():
    message = "use_backend\\(name\\)='triton' is not one of auto, cuda, pytorch, gather"
    with pytest.raises(RFDETRError, match=message), ops.use_backend("triton"):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_use_backend_cuda_without_kernel_fails_on_entry(monkeypatch):
    if cuda_ext.kernel_loaded():
        pytest.skip("the CUDA extension is already loaded in this process")
    cuda_ext.reset_for_tests()
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    message = "use_backend\\('cuda'\\).*(no CUDA device|not a CUDA build)"
    with pytest.raises(ops.KernelBuildError, match=message), ops.use_backend("cuda"):
        pytest.fail("the block must not run")
    assert ops.requested_backend() == "auto"
    cuda_ext.reset_for_tests()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["gather", "pytorch", "cuda"])
def test_use_backend_on_cuda_tensors(backend, monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    shapes = SHAPES["4-levels-odd"]
    value, loc, attn = _inputs(shapes, seed=7, device="cuda")
    ref = ops.ms_deform_attn_pytorch(value.double(), shapes, loc.double(), attn.double())
    with ops.use_backend(backend):
        if backend != "cuda":
            monkeypatch.setattr(ops, "use_cuda_kernel", lambda: pytest.fail("must not use the kernel"))
        out = torch.ops.rfdetr.ms_deform_attn(value, shapes, loc, attn)
    assert out.is_cuda and (out.double() - ref).abs().max() <= 1e-5
