"""One training step with the criterion's layer-batched loss pass through inductor, as CUDA training runs it.

On the CPU the criterion goes layer by layer and the mask head does not fold its projection into the queries;
this script forces both CUDA choices (``batch_layers = True``, ``fold_in_training = True``), so the compiled pass
of a CUDA step can be tried on a machine without a GPU, e.g. under another torch version:

    python benchmarks/compile_losses_repro.py [--variant seg-nano] [--batch 2] [--no-fold] [--no-amp]

Prints the torch version and the total loss, or the ``CriterionCompileError`` with torch's cause. Written to
reproduce torch 2.11's inductor failure of 2026-12-07 (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_profile import _targets  # the step benchmark's random targets


def main() -> None:
    from rfdetr_core.factory import build_model
    from rfdetr_core.variants import get_variant
    from rfdetr_train.losses import build_criterion

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="seg-nano")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--no-fold", dest="fold", action="store_false", help="the CPU's mask-head layout instead")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="float32 instead of bf16 autocast")
    args = ap.parse_args()
    v = get_variant(args.variant)
    torch.manual_seed(0)
    model = build_model(v, args.classes).train()
    model.mask_head.fold_in_training = args.fold
    criterion = build_criterion(args.classes, v.group_detr, segmentation=True, compile_losses=True)
    criterion.batch_layers = True
    images = torch.randn(args.batch, 3, v.resolution, v.resolution)
    targets = _targets(args.batch, args.classes, v.resolution, torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.variant}, fold {args.fold}, bf16 autocast {args.amp}", flush=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
        losses = criterion(model(images), targets)
    total = criterion.total_loss(losses)
    total.backward()
    print(f"total loss {float(total.detach()):.6f} after {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
