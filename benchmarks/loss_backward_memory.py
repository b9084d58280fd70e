"""Memory of the criterion's hand-written backward passes at seg-medium's training shapes (batch 8), on CPU.

    python benchmarks/loss_backward_memory.py --term class [--float32-stack]
    python benchmarks/loss_backward_memory.py --term mask

``class``: the class loss's closed-form backward (``ia_bce_terms(recompute=True)``) on ``L`` bf16 logit layers
``[B, G*Q, K]`` (6 layers, 13 groups x 200 queries, 80 classes), stacked as the layer-batched criterion does
(``--float32-stack``: a float32 stack, as before 2026-12-08). ``mask``: one layer's mask-loss sampling of lazy
entries (``layer_batch._QueryMapPoints``: 1-14 objects per image x 13 groups, 256 channels, 108 x 108 maps,
729 points). Prints the bytes kept for the backward pass (class) and the peak of the bytes the backward pass allocates
(``torch.profiler`` memory events, CPU allocator; the same tensors are made on CUDA, where these run at the start
of the backward pass, when a training step's memory peaks). To compare with older code, run this file with that
code's ``packages/*/src`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def _class_loss(g: torch.Generator, float32_stack: bool) -> torch.Tensor:
    from rfdetr_train.losses.loss_terms import ia_bce_terms

    layers, shape, m = 6, (8, 2600, 80), 500
    logits = [torch.randn(*shape, generator=g).to(torch.bfloat16).requires_grad_(True) for _ in range(layers)]
    cells = (
        torch.randint(0, layers, (m,), generator=g),
        torch.randint(0, shape[0], (m,), generator=g),
        torch.randperm(shape[1], generator=g)[:m],
        torch.randint(0, shape[2], (m,), generator=g),
    )
    xy = torch.rand(m, 2, generator=g)
    src, tgt = torch.cat([xy, xy + 0.2], 1), torch.cat([xy + 0.05, xy + 0.25], 1)
    stacked = torch.stack([x.float() for x in logits]) if float32_stack else torch.stack(logits)
    return ia_bce_terms(stacked, cells, src, tgt, 0.25, 2.0, recompute=True).flatten(1).sum(1).sum()


def _mask_loss(g: torch.Generator) -> torch.Tensor:
    from rfdetr_train.losses.layer_batch import _pad_slots, _query_products, _QueryMapPoints

    counts = [int(n) * 13 for n in torch.randint(1, 15, (8,), generator=g)]
    bsz, channels, h, w, points = len(counts), 256, 108, 108, 729
    batch_idx = torch.repeat_interleave(torch.arange(bsz), torch.tensor(counts))
    m = int(batch_idx.numel())
    query = torch.randn(m, channels, generator=g).to(torch.bfloat16).requires_grad_(True)
    spatial = torch.randn(bsz, channels, h * w, generator=g).to(torch.bfloat16).requires_grad_(True)
    bias = torch.randn(m, generator=g).requires_grad_(True)
    coords = torch.rand(m, points, 2, generator=g)
    slots, maxn = _pad_slots(batch_idx, counts)
    with torch.no_grad():
        maps = (_query_products(query, spatial, slots, maxn)[0].float() + bias[:, None]).view(m, 1, h, w)
    return _QueryMapPoints.apply(query, spatial, bias, maps, coords, slots, maxn).sum()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--term", choices=("class", "mask"), required=True)
    p.add_argument("--float32-stack", action="store_true", help="class: stack the layers in float32 (the code before)")
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = _class_loss(g, args.float32_stack) if args.term == "class" else _mask_loss(g)
    kept = sum(t.numel() * t.element_size() for t in saved if not t.is_leaf)  # the leaves are the model's
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    live = peak = 0
    for _, nbytes in sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ):
        live += nbytes
        peak = max(peak, live)
    if args.term == "class":
        what = f"class loss, {'float32' if args.float32_stack else 'bf16'} stack: kept for backward {kept / 2**20:.1f} MiB"
    else:  # its inputs stand for model outputs and gathers (leaves here): what it keeps is theirs
        what = "mask loss (one layer)"
    print(f"torch {torch.__version__}, {what}, backward's allocation peak {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
