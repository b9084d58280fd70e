"""``sample_biased_products`` (the layer-batched mask loss's sampling, which keeps the products rather than the
float32 maps for backward) against ``sample_points`` of the float32 maps through autograd."""

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
