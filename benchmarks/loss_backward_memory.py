"""Memory of the class loss's closed-form backward (``ia_bce_terms(recompute=True)``) at a training shape, on CPU.

    python benchmarks/class_loss_memory.py [--layers 6 --batch 8 --queries 2600 --classes 80] [--float32-stack]

Builds ``L`` bf16 logit layers ``[B, G*Q, K]`` (what the decoder gives under bf16 autocast; seg-medium at batch 8:
6 layers, 13 groups x 200 queries), stacks them as the layer-batched criterion does (``--float32-stack``: a float32
stack, as before 2026-12-08), runs the loss and prints the bytes the loss keeps for its backward pass and the peak
of the bytes its backward pass allocates (``torch.profiler`` memory events, CPU allocator; the same tensors are
made on CUDA, where this runs at the start of the backward pass, when a training step's memory peaks).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from rfdetr_train.losses.loss_terms import ia_bce_terms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--queries", type=int, default=2600, help="queries of all groups per image")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--pairs", type=int, default=500, help="matched (layer, image, query, class) cells")
    p.add_argument("--float32-stack", action="store_true", help="stack the layers in float32 (the code before)")
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.queries, args.classes)
    layers = [torch.randn(*shape, generator=g).to(torch.bfloat16).requires_grad_(True) for _ in range(args.layers)]
    m = args.pairs
    cells = (
        torch.randint(0, args.layers, (m,), generator=g),
        torch.randint(0, args.batch, (m,), generator=g),
        torch.randperm(args.queries, generator=g)[:m],
        torch.randint(0, args.classes, (m,), generator=g),
    )
    xy = torch.rand(m, 2, generator=g)
    src, tgt = torch.cat([xy, xy + 0.2], 1), torch.cat([xy + 0.05, xy + 0.25], 1)

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = torch.stack([x.float() for x in layers]) if args.float32_stack else torch.stack(layers)
        loss = ia_bce_terms(logits, cells, src, tgt, 0.25, 2.0, recompute=True).flatten(1).sum(1).sum()
    del logits
    kept = sum(t.numel() * t.element_size() for t in saved)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    live = peak = 0
    for _, nbytes in sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ):
        live += nbytes
        peak = max(peak, live)
    stack = "float32" if args.float32_stack else "bf16"
    print(
        f"torch {torch.__version__}, logits {args.layers} x {list(shape)}, {stack} stack: kept for backward "
        f"{kept / 2**20:.1f} MiB, backward's allocation peak {peak / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
