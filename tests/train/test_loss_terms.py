"""The closed-form gradient of the IoU-aware BCE (``ia_bce_terms(recompute=True)``) against autograd's."""

from __future__ import annotations

import torch

from rfdetr_train.losses.loss_terms import ia_bce_terms


def _case(dtype: torch.dtype, scale: float):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) * scale).to(dtype)
    m = 6
    cells = (
        torch.tensor([0, 0, 1, 1, 0, 1]),
        torch.tensor([0, 1, 2, 0, 2, 1]),
        torch.tensor([0, 3, 4, 1, 2, 0]),
        torch.randint(0, 4, (m,), generator=g),
    )
    xy = torch.rand(m, 2, generator=g, dtype=dtype)
    src = torch.cat([xy, xy + torch.rand(m, 2, generator=g, dtype=dtype) + 0.1], 1)
    tgt = torch.cat([xy + 0.05, xy + torch.rand(m, 2, generator=g, dtype=dtype) + 0.1], 1)
    return logits, cells, src, tgt


def _value_and_grad(logits, cells, src, tgt, recompute):
    x = logits.clone().requires_grad_(True)
    terms = ia_bce_terms(x, cells, src, tgt, 0.25, 2.0, recompute=recompute)
    (terms * torch.linspace(0.5, 1.5, terms.numel(), dtype=terms.dtype).view_as(terms)).sum().backward()
    return terms.detach(), x.grad


def test_closed_form_gradient_equals_autograds_in_float64():
    # (torch.autograd.gradcheck does not apply: its finite differences also move the detached targets t.)
    logits, cells, src, tgt = _case(torch.float64, scale=3.0)
    (_, want), (_, got) = (_value_and_grad(logits, cells, src, tgt, r) for r in (False, True))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_recompute_gives_autograds_values_and_gradients_in_float32():
    for scale in (1.0, 30.0):  # 30: saturated sigmoids, where the stable forms matter
        logits, cells, src, tgt = _case(torch.float32, scale)
        results = [_value_and_grad(logits, cells, src, tgt, r) for r in (False, True)]
        assert torch.equal(results[0][0], results[1][0])  # the forward is the same code
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
        assert torch.isfinite(results[1][1]).all()


def test_bf16_logits_are_kept_as_bf16_and_get_float32s_gradient_rounded_once():
    """Under autocast the layers' logits are bf16: the closed form keeps them as they are (half a float32 copy)
    and returns the float32 gradient rounded to bf16, as autograd through a float32 copy does."""
    logits, cells, src, tgt = _case(torch.float32, scale=3.0)
    half = logits.to(torch.bfloat16)
    want_terms, want = _value_and_grad_through_float32(half, cells, src, tgt)
    got_terms, got = _value_and_grad(half, cells, src, tgt, recompute=True)
    assert got.dtype == torch.bfloat16 and got_terms.dtype == torch.float32
    assert torch.equal(got_terms, want_terms)  # computed in float32 from the same values
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-6)  # one bf16 rounding apart at most
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ia_bce_terms(half.clone().requires_grad_(True), cells, src, tgt, 0.25, 2.0, recompute=True)
    big = [t for t in saved if t.numel() == half.numel()]
    assert [t.dtype for t in big] == [torch.bfloat16]  # the logits alone, and no float32 copy of them


def _value_and_grad_through_float32(logits, cells, src, tgt):
    """Autograd's gradient through a float32 copy of ``logits`` (the path before bf16 logits were kept)."""
    x = logits.clone().requires_grad_(True)
    terms = ia_bce_terms(x.float(), cells, src, tgt, 0.25, 2.0, recompute=False)
    (terms * torch.linspace(0.5, 1.5, terms.numel(), dtype=terms.dtype).view_as(terms)).sum().backward()
    return terms.detach(), x.grad
