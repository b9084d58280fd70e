"""Validation of a real model over large source images: peak GPU memory against the training step's.

Issue 6's device point: ``seg-medium`` with random weights, every detection kept (score threshold 0, masks
at logit 0), source images of 1920x1080, in one process:

1. a training step (forward in train mode with all query groups, criterion with matcher, backward, AdamW),
   batch ``--train-batch`` at the variant's resolution: its peak ``max_memory_allocated``;
2. validation with ``rfdetr_train.evaluation.Evaluator`` (forward in eval mode + masks to RLE at the source
   size + COCO metrics): its peak and time;
3. the naive path on the same outputs (every kept mask upsampled to 1080p in chunks of 32, thresholded,
   copied to the host, ``pycocotools.mask.encode``, pycocotools COCOeval): its peak and time.

Random weights give masks that are positive over much of the image, the worst case for our crop rule; the
gain then comes from never moving full-size masks to the host.

    python benchmarks/eval_gpu_memory.py [--variant seg-medium] [--images 32] [--device cuda] [--json out]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time

import numpy as np
import torch

SRC_H, SRC_W = 1080, 1920


def _gt(n_images: int, num_classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": i + 1, "height": SRC_H, "width": SRC_W})
        for _ in range(int(rng.integers(1, 12))):
            w, h = rng.uniform(20, 600), rng.uniform(20, 400)
            x, y = rng.uniform(0, SRC_W - w), rng.uniform(0, SRC_H - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, num_classes + 1)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)],
    }


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")


def _reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_step_peak(model, variant, num_classes: int, batch: int, device, amp) -> float:
    """Peak memory of one full training step at the variant's resolution (1-10 boxes per image)."""
    from rfdetr_train.losses.criterion import build_criterion

    res = variant.resolution
    criterion = build_criterion(num_classes, variant.group_detr)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 11, (1,), generator=g))
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        masks = torch.rand(n, res, res, generator=g) > 0.5
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (n,), generator=g).to(device),
                "boxes": torch.cat([cxcy, wh], 1).to(device),
                "masks": masks.to(device),
            }
        )
    images = torch.randn(batch, 3, res, res, generator=g).to(device)
    model.train()
    for step in range(2):  # the first step allocates the optimiser state; the second is the steady peak
        if step == 1:
            _reset(device)
        with amp():
            out = model(images)
        losses = criterion(out, targets)
        total = criterion.total_loss(losses)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    _sync(device)
    peak = _peak(device)
    del opt, out, losses, total
    model.zero_grad(set_to_none=True)
    return peak


@torch.no_grad()
def validate(model, variant, gt, batch: int, device, amp, path: str) -> tuple[float, float, dict]:
    """Time and peak memory of one validation pass (``path`` = ``ours`` or ``naive``)."""
    from rfdetr_core.class_map import ClassMap
    from rfdetr_core.postprocess import boxes_to_pixels, select_topk
    from rfdetr_train.evaluation import Evaluator
    from rfdetr_train.evaluation.coco_reference import logits_to_rle_naive
    from rfdetr_train.evaluation.coco_sets import coco_from_dict

    model.eval()
    res = variant.resolution
    n_img = len(gt["images"])
    num_select = variant.num_queries
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(min(batch, n_img - s), 3, res, res, generator=g) for s in range(0, n_img, batch)]
    cats = gt["categories"]
    ev = Evaluator(gt, ClassMap.from_coco_categories(cats), max_dets=num_select)
    results = []
    _reset(device)
    t0 = time.perf_counter()
    for bi, x in enumerate(inputs):
        with amp():
            out = model(x.to(device))
        ids = [bi * batch + j + 1 for j in range(x.shape[0])]
        targets = [{"image_id": i, "orig_size": torch.tensor([SRC_H, SRC_W])} for i in ids]
        if path == "ours":
            ev.update(out, targets)
            continue
        sizes = torch.tensor([[SRC_H, SRC_W]] * x.shape[0], device=device, dtype=torch.float32)
        scores, slots, queries = select_topk(out["pred_logits"].float(), num_select)
        xyxy = boxes_to_pixels(out["pred_boxes"].float(), queries, sizes)
        for j, img_id in enumerate(ids):
            rles, _ = logits_to_rle_naive(out["pred_masks"][j, queries[j]].float(), (SRC_H, SRC_W))
            b = xyxy[j].cpu().double().numpy()
            for k, (sc, cl) in enumerate(zip(scores[j].tolist(), slots[j].tolist(), strict=True)):
                x0, y0, x1, y1 = b[k].tolist()
                results.append(
                    {
                        "image_id": img_id,
                        "category_id": cl + 1,
                        "score": sc,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": rles[k],
                    }
                )
    _sync(device)
    t_forward_post = time.perf_counter() - t0
    if path == "ours":
        rep = ev.compute()
        ap = {k: rep.metrics[k]["AP"] for k in ("bbox", "segm")}
    else:
        from pycocotools.cocoeval import COCOeval

        ap = {}
        coco_gt = coco_from_dict(gt)
        for kind in ("bbox", "segm"):
            drop = "segmentation" if kind == "bbox" else "bbox"
            with contextlib.redirect_stdout(io.StringIO()):
                e = COCOeval(
                    coco_gt,
                    coco_gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results]),
                    kind,
                )
                e.evaluate()
                e.accumulate()
                e.summarize()
            ap[kind] = float(e.stats[0])
    total = time.perf_counter() - t0
    return total, _peak(device), {"AP": ap, "forward_and_postprocess_s": t_forward_post}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="seg-medium")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--val-batch", type=int, default=8)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args()

    from rfdetr_core.factory import create_model
    from rfdetr_core.variants import get_variant

    device = torch.device(args.device)
    variant = get_variant(args.variant)
    torch.manual_seed(0)
    model = create_model(variant, num_classes=args.classes, device=device)

    def amp():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    train_peak = training_step_peak(model, variant, args.classes, args.train_batch, device, amp)
    gt = _gt(args.images, args.classes)
    with torch.no_grad(), amp():  # warm-up of the eval-mode kernels, so neither path pays it
        model.eval()(torch.randn(args.val_batch, 3, variant.resolution, variant.resolution, device=device))
    rows = {}
    for path in ("ours", "naive"):
        t, peak, extra = validate(model, variant, gt, args.val_batch, device, amp, path)
        rows[path] = {"time_s": t, "peak_mib": peak, **extra}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.variant} on {name}, torch {torch.__version__}; {args.images} source images {SRC_W}x{SRC_H}")
    print(f"training step (batch {args.train_batch}, {variant.resolution}px): peak {train_peak:.0f} MiB")
    for path, r in rows.items():
        print(
            f"validation {path:<5} (batch {args.val_batch}, {variant.num_queries} detections/image): "
            f"{r['time_s']:.2f} s, peak {r['peak_mib']:.0f} MiB, box AP {r['AP']['bbox']:.4f}, "
            f"mask AP {r['AP']['segm']:.4f}"
        )
    ratio = rows["ours"]["time_s"] / rows["naive"]["time_s"]
    print(
        f"ours / naive time {ratio:.3f}x; ours peak / training peak {rows['ours']['peak_mib'] / train_peak:.3f}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"variant": args.variant, "device": name, "train_peak_mib": train_peak, **rows}, fh, indent=2
            )


if __name__ == "__main__":
    main()
