"""``sample_biased_products`` (the layer-batched mask loss's sampling of dense masks, which keeps the products
rather than the float32 maps for backward) and ``layer_batch._QueryMapPoints`` (the same for lazy mask entries,
keeping neither) against ``sample_points`` of the float32 maps through autograd."""

from __future__ import annotations

import pytest
import torch

from rfdetr_train.losses.point_sampling import sample_biased_products, sample_points


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_biased_products_sample_like_sample_points(dtype):
    g = torch.Generator().manual_seed(0)
    m, h, w, p = 5, 7, 9, 40
    products = (torch.randn(m, h * w, generator=g) * 3).to(dtype)
    bias = torch.randn(m, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    coords = torch.rand(m, p, 2, generator=g, dtype=bias.dtype) * 1.2 - 0.1  # some outside [0, 1]: border
    weights = torch.randn(m, p, generator=g, dtype=bias.dtype)
    results = []
    for lean in (False, True):
        x, b = products.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        if lean:
            maps = (x.detach().to(b.dtype) + b.detach()[:, None]).view(m, 1, h, w)
            out = sample_biased_products(x, b, maps, coords)
        else:
            out = sample_points((x.to(b.dtype) + b[:, None]).view(m, 1, h, w), coords)[:, 0]
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad, b.grad))
    (want, want_dx, want_db), (got, got_dx, got_db) = results
    assert got.shape == (m, p) and got.dtype == bias.dtype
    assert torch.equal(got, want)  # the same kernel on the same maps
    assert got_dx.dtype == dtype
    torch.testing.assert_close(got_dx, want_dx, rtol=0, atol=0)
    torch.testing.assert_close(got_db, want_db, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_map_points_equal_autograd_through_the_products_and_keep_no_products(dtype):
    """The lazy entries' sampling (``layer_batch._QueryMapPoints``) recomputes the ``[M, h*w]`` products in its
    backward pass instead of keeping them: the same values and gradients as autograd through ``bmm``, the row
    gather and ``sample_points``, bit for bit."""
    from rfdetr_train.losses.layer_batch import _pad_slots, _query_products, _QueryMapPoints

    g = torch.Generator().manual_seed(1)
    counts = [3, 1, 4]  # pairs per image
    bsz, c, h, w, p = len(counts), 6, 7, 9, 30
    batch_idx = torch.repeat_interleave(torch.arange(bsz), torch.tensor(counts))
    m = int(batch_idx.numel())
    query = torch.randn(m, c, generator=g).to(dtype)
    spatial = torch.randn(bsz, c, h * w, generator=g).to(dtype)
    bias = torch.randn(m, generator=g)
    coords = torch.rand(m, p, 2, generator=g) * 1.2 - 0.1
    weights = torch.randn(m, p, generator=g)
    slots, maxn = _pad_slots(batch_idx, counts)
    results = []
    for lean in (False, True):
        q, s, b = (t.clone().requires_grad_(True) for t in (query, spatial, bias))
        saved: list[tuple] = []

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if lean:
                with torch.no_grad():
                    maps = (_query_products(q, s, slots, maxn)[0].float() + b[:, None]).view(m, 1, h, w)
                out = _QueryMapPoints.apply(q, s, b, maps, coords, slots, maxn)
            else:
                products = _query_products(q, s, slots, maxn)[0]
                out = sample_points((products.float() + b[:, None]).view(m, 1, h, w), coords)[:, 0]
        (out * weights).sum().backward()
        results.append((out.detach(), q.grad, s.grad, b.grad, saved))
    want, got = results
    for a, b in zip(got[:4], want[:4], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert (m, 1, h, w) in want[4]  # autograd keeps the float32 maps for grid_sample's backward
    assert (m, 1, h, w) not in got[4] and (m, h * w) not in got[4]  # the Function keeps neither maps nor products
    assert (bsz, c, h * w) in got[4]  # but the spatial map (alive anyway: a model output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_map_points_gives_the_spatial_gradient_in_the_maps_layout(dtype):
    """A compiled mask head's maps can be channels-last (inductor's layout on CUDA), and a compiled model's backward
    copies a gradient of another layout into its output's layout (one ``[B, C, h, w]`` copy per layer at the
    step's memory peak). The Function's
    gradient of a channels-last map comes in that layout (and a contiguous map's stays contiguous), with autograd's
    values."""
    from rfdetr_train.losses.layer_batch import _pad_slots, _query_products, _QueryMapPoints

    g = torch.Generator().manual_seed(2)
    counts = [2, 3]
    bsz, c, h, w, p = len(counts), 5, 6, 4, 20
    batch_idx = torch.repeat_interleave(torch.arange(bsz), torch.tensor(counts))
    m = int(batch_idx.numel())
    query = torch.randn(m, c, generator=g).to(dtype)
    bias = torch.randn(m, generator=g)
    coords = torch.rand(m, p, 2, generator=g)
    weights = torch.randn(m, p, generator=g)
    slots, maxn = _pad_slots(batch_idx, counts)
    maps_nchw = torch.randn(bsz, c, h, w, generator=g).to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        spatial = maps_nchw.contiguous(memory_format=layout).requires_grad_(True)
        flat = spatial.flatten(2)  # [B, C, h*w], a view in both layouts
        q = query.clone().requires_grad_(True)
        with torch.no_grad():
            maps = (_query_products(q, flat, slots, maxn)[0].float() + bias[:, None]).view(m, 1, h, w)
        out = _QueryMapPoints.apply(q, flat, bias, maps, coords, slots, maxn)
        (got,) = torch.autograd.grad((out * weights).sum(), [flat])
        assert got.stride() == flat.stride(), (layout, got.stride(), flat.stride())
        products = _query_products(q, flat, slots, maxn)[0]
        ref = sample_points((products.float() + bias[:, None]).view(m, 1, h, w), coords)[:, 0]
        (want,) = torch.autograd.grad((ref * weights).sum(), [flat])
        torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_a_compiled_mask_head_takes_the_spatial_gradients_without_copying_them(monkeypatch):
    """The mechanism behind the strides test above, end to end on CPU: a compiled mask head whose maps come out
    channels-last (as inductor lays them out on CUDA; here channels-last input features) and the lazy mask loss's
    backward. AOTAutograd copies every incoming gradient whose layout differs from its output's
    (``coerce_to_expected_memory_format``, counted here); with the gradient in the map's layout it copies none.
    ``aot_eager`` runs AOTAutograd's runtime wrappers as inductor does, without code generation."""
    torch._dynamo.reset()
    from torch._functorch._aot_autograd import runtime_wrappers

    from rfdetr_core.models.mask_head import MaskHead
    from rfdetr_train.losses.layer_batch import _pad_slots, _query_products, _QueryMapPoints

    if not hasattr(runtime_wrappers, "coerce_to_expected_memory_format"):
        pytest.skip("this torch has no coerce_to_expected_memory_format to count")
    copies = []
    coerce = runtime_wrappers.coerce_to_expected_memory_format

    def counting(x, memory_format):
        out = coerce(x, memory_format)
        if out is not x:
            copies.append(tuple(x.shape))
        return out

    monkeypatch.setattr(runtime_wrappers, "coerce_to_expected_memory_format", counting)
    g = torch.Generator().manual_seed(3)
    head = MaskHead(16, 2)
    head.fold_in_training = True
    features = torch.randn(2, 16, 6, 8, generator=g).contiguous(memory_format=torch.channels_last)
    hs = [torch.randn(2, 5, 16, generator=g) for _ in range(2)]
    layers, _ = torch.compile(head.lazy, backend="aot_eager")(features.requires_grad_(True), hs, None, (48, 64))
    batch_idx, query_idx = torch.tensor([0, 0, 1]), torch.tensor([1, 3, 0])
    slots, maxn = _pad_slots(batch_idx, [2, 1])
    total = 0
    for entry in layers:
        spatial = entry["spatial_features"]
        assert spatial.is_contiguous(memory_format=torch.channels_last)
        flat = spatial.flatten(2)
        query = entry["query_features"][batch_idx, query_idx]
        bias = entry["bias"][batch_idx, query_idx].float()
        with torch.no_grad():
            maps = (_query_products(query, flat, slots, maxn)[0].float() + bias[:, None]).view(3, 1, 12, 16)
        coords = torch.rand(3, 10, 2, generator=g)
        total = total + _QueryMapPoints.apply(query, flat, bias, maps, coords, slots, maxn).sum()
    total.backward()
    torch._dynamo.reset()
    assert features.grad is not None
    assert copies == []
