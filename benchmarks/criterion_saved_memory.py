"""What the training criterion keeps for the backward pass, by size and source line, on CPU.

    python benchmarks/criterion_saved_memory.py [--variant seg-medium] [--batch 8] [--top 12]

One bf16-autocast forward of a random-init model on random images and targets (the step benchmark's), then the
criterion as CUDA training runs it (layer-batched pass, mask projection folded into the queries) under a
``saved_tensors_hooks`` that records every tensor autograd keeps, once per storage, excluding the parameters.
What the criterion keeps lives from the criterion to the backward pass, i.e. at the start of the backward pass,
where a CUDA training step's memory peaks. Tensors the model also keeps (the lazy mask entries' spatial maps,
outputs of the model) are listed but are not extra on the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_profile import _targets  # the step benchmark's random targets


def main() -> None:
    from rfdetr_core.factory import build_model
    from rfdetr_core.variants import get_variant
    from rfdetr_train.losses import build_criterion

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="seg-medium")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()

    v = get_variant(args.variant)
    torch.manual_seed(0)
    model = build_model(v, num_classes=args.classes).train()
    model.mask_head.fold_in_training = True  # as on CUDA
    criterion = build_criterion(args.classes, v.group_detr, segmentation=v.is_segmentation)
    criterion.batch_layers = True  # as on CUDA
    images = torch.randn(args.batch, 3, v.resolution, v.resolution, generator=torch.Generator().manual_seed(0))
    targets = _targets(args.batch, args.classes, v.resolution, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}
    kept: dict[int, tuple[int, tuple, str, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in kept and key not in params:
            frames = [f for f in traceback.extract_stack() if "rfdetr" in f.filename]
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
            kept[key] = (t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype).removeprefix("torch."), where)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = criterion.total_loss(criterion(out, targets))
    total = sum(k[0] for k in kept.values())
    print(f"torch {torch.__version__}, {args.variant}, batch {args.batch}: the criterion keeps {total / 2**20:.1f} MiB "
          f"in {len(kept)} tensors (loss {float(loss):.4f})")
    for nbytes, shape, dtype, where in sorted(kept.values(), reverse=True)[: args.top]:
        print(f"  {nbytes / 2**20:8.2f} MiB  {dtype:9} {str(list(shape)):24} {where}")


if __name__ == "__main__":
    main()
