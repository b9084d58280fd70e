"""CPU training runs the decoder self-attention through the reference (math) kernel: the float order of 0.1.x."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rfdetr_core.models.transformer import GroupSelfAttention


def _reference(attn: GroupSelfAttention, tgt, pos, groups):
    # 0.1.x: 5-d query/key/value, which torch runs through its math kernel
    b, n, c = tgt.shape
    d = c // attn.heads
    w, bias = attn.in_proj.weight, attn.in_proj.bias
    qk = F.linear(tgt + pos, w[: 2 * c], bias[: 2 * c])
    v = F.linear(tgt, w[2 * c :], bias[2 * c :])
    qk = qk.view(b, groups, n // groups, 2, attn.heads, d).permute(3, 0, 1, 4, 2, 5)
    v = v.view(b, groups, n // groups, attn.heads, d).transpose(2, 3)
    out = F.scaled_dot_product_attention(qk[0], qk[1], v)
    return attn.out_proj(out.transpose(2, 3).reshape(b, n, c))


def test_cpu_training_attention_is_bit_identical_to_the_5d_reference():
    torch.manual_seed(0)
    attn = GroupSelfAttention(96, 4)
    tgt = torch.randn(4, 4 * 30, 96, requires_grad=True)
    pos = torch.randn(4, 4 * 30, 96)
    ours = attn(tgt, pos, 4)
    (ours_grad,) = torch.autograd.grad(ours.square().sum(), tgt)
    ref = _reference(attn, tgt, pos, 4)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), tgt)
    assert torch.equal(ours, ref)
    assert torch.equal(ours_grad, ref_grad)
    with torch.no_grad():  # inference takes the fused kernel: equal up to float order
        torch.testing.assert_close(attn(tgt, pos, 4), ref, rtol=1e-5, atol=1e-6)
