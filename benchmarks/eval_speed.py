"""Validation speed: model outputs (mask logits at H/4) -> COCO box + mask metrics, ours vs the naive path.

Headline (issue 6): 500 source images of 640x480, 100 detections each, mask logits on a 108x108 grid
(seg-medium's 432 input / 4), 20 classes, 200 queries.

* naive  = what upstream-style validation does: top-k, upsample every kept mask to the source size
  (bilinear, chunks of 32), threshold, ``pycocotools.mask.encode``, then pycocotools ``loadRes`` +
  ``COCOeval`` for bbox and segm.
* ours   = ``rfdetr_train.evaluation.Evaluator``: the same top-k, masks upsampled only where they can be
  positive (each query once), run boundaries straight to RLE, then the vectorised COCOeval, plus per-class
  tables and confusion matrices (extra work the naive path does not do).

Each path runs in its own child process on identical generated data (generation is not timed), so peak
memory (max RSS on CPU, ``max_memory_allocated`` on CUDA) is each path's own. Secondary: the COCOeval step
alone on identical detections (ours vs pycocotools). Prints a table and writes JSON.

    uv run --frozen python benchmarks/eval_speed.py [--images 500] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import platform
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

SRC_H, SRC_W = 480, 640
NUM_CLASSES, NUM_QUERIES, MAX_DETS = 20, 200, 100


def make_batch(seed: int, batch: int, grid: int, device: str):
    """Outputs + targets + COCO ground truth of ``batch`` images (objects are ellipses on the grid)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")

    def field(n):
        cy, cx = torch.rand(n, 1, 1, generator=g) * grid, torch.rand(n, 1, 1, generator=g) * grid
        # radii log-uniform from under a grid cell to a third of the image: small, medium and large objects
        ry = torch.exp(torch.empty(n, 1, 1).uniform_(np.log(0.7), np.log(grid / 3), generator=g))
        rx = ry * torch.exp(torch.empty(n, 1, 1).uniform_(-0.5, 0.5, generator=g))
        return (4.0 * (1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2)).clamp(min=-10.0)  # [n, g, g]

    logits = -6.0 + torch.randn(batch, NUM_QUERIES, NUM_CLASSES, generator=g)
    masks = field(batch * NUM_QUERIES).reshape(batch, NUM_QUERIES, grid, grid)
    masks = masks + 0.7 * torch.randn(masks.shape, generator=g)
    boxes = torch.rand(batch, NUM_QUERIES, 4, generator=g) * 0.5 + 0.1
    images, anns, targets = [], [], []
    for b in range(batch):
        img_id = seed * 1000 + b
        images.append({"id": img_id, "height": SRC_H, "width": SRC_W})
        n_obj = int(torch.randint(1, 16, (1,), generator=g))
        gt_field = field(n_obj)
        gt_masks = F.interpolate(gt_field[:, None], size=(SRC_H, SRC_W), mode="bilinear")[:, 0] > 0
        from pycocotools import mask as mask_utils

        for j in range(n_obj):
            m = gt_masks[j].numpy()
            if not m.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            cat = int(torch.randint(0, NUM_CLASSES, (1,), generator=g))
            crowd = int(torch.rand(1, generator=g) < 0.03)
            anns.append(
                {
                    "id": len(anns) + 1 + seed * 100000,
                    "image_id": img_id,
                    "category_id": cat + 1,
                    "bbox": [x, y, w, h],
                    "area": float(m.sum()),
                    "iscrowd": crowd,
                    "segmentation": {"size": [SRC_H, SRC_W], "counts": rle["counts"].decode()},
                }
            )
            # the first queries predict the objects (noisy mask, jittered box, a high class logit)
            masks[b, j] = gt_field[j] + 0.7 * torch.randn(grid, grid, generator=g)
            jit = 1 + 0.05 * torch.randn(4, generator=g)
            boxes[b, j] = torch.tensor([(x + w / 2) / SRC_W, (y + h / 2) / SRC_H, w / SRC_W, h / SRC_H]) * jit
            logits[b, j, cat] = 2.0 + torch.randn(1, generator=g)
        targets.append({"image_id": img_id, "orig_size": torch.tensor([SRC_H, SRC_W])})
    outputs = {
        "pred_logits": logits.to(device),
        "pred_boxes": boxes.to(device),
        "pred_masks": masks.to(device),
    }
    return outputs, targets, images, anns


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_path(path: str, n_images: int, batch: int, grid: int, device: str, threads: int, queue) -> None:
    """Child process: run one path over all batches; report time, memory and metrics."""
    from rfdetr_core.class_map import ClassMap
    from rfdetr_core.postprocess import boxes_to_pixels, select_topk
    from rfdetr_train.evaluation import Evaluator
    from rfdetr_train.evaluation.coco_reference import logits_to_rle_naive
    from rfdetr_train.evaluation.coco_sets import coco_from_dict

    if threads:
        torch.set_num_threads(threads)
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    images, anns, batches = [], [], []
    for s in range(0, n_images, batch):
        batches.append(s // batch + 1)
    # ground truth first (the evaluator is built on it); outputs are regenerated per batch below, since
    # keeping 500 x 200 mask grids would take gigabytes
    gen_time = 0.0
    t_post = 0.0
    cpu_post = 0.0
    results = []
    for seed in batches:
        t0 = time.perf_counter()
        _, _, im, an = make_batch(seed, min(batch, n_images - (seed - 1) * batch), grid, device)
        gen_time += time.perf_counter() - t0
        images += im
        anns += an
    gt = {"images": images, "annotations": anns, "categories": cats}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ev = Evaluator(gt, ClassMap.from_coco_categories(cats), max_dets=MAX_DETS) if path == "ours" else None
    for seed in batches:
        out, tg, _, _ = make_batch(seed, min(batch, n_images - (seed - 1) * batch), grid, device)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        if path == "ours":
            ev.update(out, tg)
        else:
            sizes = torch.stack([t["orig_size"] for t in tg]).to(device)
            scores, slots, queries = select_topk(out["pred_logits"], MAX_DETS)
            xyxy = boxes_to_pixels(out["pred_boxes"], queries, sizes.float())
            for i, t in enumerate(tg):
                rles, _ = logits_to_rle_naive(out["pred_masks"][i, queries[i]], (SRC_H, SRC_W))
                b = xyxy[i].cpu().double().numpy()
                sc, cl = scores[i].cpu().tolist(), slots[i].cpu().tolist()
                for j in range(len(rles)):
                    x0, y0, x1, y1 = b[j].tolist()
                    results.append(
                        {
                            "image_id": t["image_id"],
                            "category_id": cl[j] + 1,
                            "score": sc[j],
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "segmentation": rles[j],
                        }
                    )
        _sync(device)
        t_post += time.perf_counter() - t0
        cpu_post += time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    if path == "ours":
        rep = ev.compute()
        metrics = {k: rep.metrics[k]["AP"] for k in ("bbox", "segm")}
    else:
        from pycocotools.cocoeval import COCOeval

        metrics = {}
        coco_gt = coco_from_dict(gt)
        for kind in ("bbox", "segm"):
            with contextlib.redirect_stdout(io.StringIO()):
                # as detectron2 does: segm results without boxes so the area is the mask's
                res = [r if kind == "bbox" else {k: v for k, v in r.items() if k != "bbox"} for r in results]
                if kind == "bbox":
                    res = [{k: v for k, v in r.items() if k != "segmentation"} for r in res]
                coco_dt = coco_gt.loadRes(res)
                e = COCOeval(coco_gt, coco_dt, kind)
                e.evaluate()
                e.accumulate()
                e.summarize()
            metrics[kind] = float(e.stats[0])
    t_eval = time.perf_counter() - t0
    cpu_eval = time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            "path": path,
            "postprocess_s": t_post,
            "cocoeval_s": t_eval,
            "total_s": t_post + t_eval,
            "cpu_total_s": cpu_post + cpu_eval,
            "peak_rss_mib": peak / 1024,
            "rss_growth_mib": (peak - rss0) / 1024,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "AP": metrics,
            "generation_s": gen_time,
        }
    )


def cocoeval_only(n_images: int, grid: int, batch: int) -> dict:
    """Secondary: the COCOeval step alone on identical detections, ours vs pycocotools."""
    from rfdetr_core.class_map import ClassMap
    from rfdetr_train.evaluation import Evaluator
    from rfdetr_train.evaluation.coco_matching import evaluate_coco
    from rfdetr_train.evaluation.coco_reference import evaluate_coco_reference

    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    images, anns, batches = [], [], []
    for s in range(0, n_images, batch):
        out, tg, im, an = make_batch(s // batch + 1, min(batch, n_images - s), grid, "cpu")
        images += im
        anns += an
        batches.append((out, tg))
    gt = {"images": images, "annotations": anns, "categories": cats}
    ev = Evaluator(gt, ClassMap.from_coco_categories(cats), max_dets=MAX_DETS)
    for out, tg in batches:
        ev.update(out, tg)
    dt, seen = ev._gathered()
    out = {}
    for kind in ("bbox", "segm"):
        t0 = time.perf_counter()
        a = evaluate_coco(ev.gt, dt, kind, seen)
        t1 = time.perf_counter()
        b = evaluate_coco_reference(ev.gt, dt, kind, seen)
        t2 = time.perf_counter()
        assert np.allclose(a.stats, b.stats, atol=1e-9, rtol=0), (a.stats, b.stats)
        out[kind] = {"ours_s": t1 - t0, "pycocotools_s": t2 - t1, "ratio": (t1 - t0) / (t2 - t1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=108, help="mask grid (model input / 4)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--skip-secondary", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each path (0: torch's default)")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    rows = {}
    for path in ("naive", "ours"):
        q = ctx.Queue()
        p = ctx.Process(
            target=run_path, args=(path, args.images, args.batch, args.grid, args.device, args.threads, q)
        )
        p.start()
        rows[path] = q.get()
        p.join()
        if p.exitcode:
            sys.exit(f"{path} path failed (exit code {p.exitcode})")
    naive, ours = rows["naive"], rows["ours"]
    info = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "images": args.images,
        "source": f"{SRC_W}x{SRC_H}",
        "grid": args.grid,
        "max_dets": MAX_DETS,
    }
    print(json.dumps(info))
    print(
        f"{'path':<8} {'post-proc s':>12} {'COCOeval s':>11} {'total s':>9} {'CPU s':>8} {'peak RSS MiB':>13} "
        f"{'RSS growth':>11} {'peak CUDA MiB':>14} {'box AP':>7} {'mask AP':>8}"
    )
    for r in (naive, ours):
        cuda = f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] is not None else "-"
        print(
            f"{r['path']:<8} {r['postprocess_s']:>12.2f} {r['cocoeval_s']:>11.2f} {r['total_s']:>9.2f} "
            f"{r['cpu_total_s']:>8.2f} "
            f"{r['peak_rss_mib']:>13.0f} {r['rss_growth_mib']:>11.0f} {cuda:>14} {r['AP']['bbox']:>7.4f} "
            f"{r['AP']['segm']:>8.4f}"
        )
    ratio = ours["total_s"] / naive["total_s"]
    cpu_ratio = ours["cpu_total_s"] / naive["cpu_total_s"]
    print(f"ours / naive: wall time {ratio:.3f}x (target <= 0.3x), CPU time {cpu_ratio:.3f}x")
    result = {"info": info, "naive": naive, "ours": ours, "ratio": ratio, "cpu_ratio": cpu_ratio}
    if not args.skip_secondary:
        sec = cocoeval_only(min(args.images, 500), args.grid, args.batch)
        for kind, r in sec.items():
            print(
                f"COCOeval only ({kind}): ours {r['ours_s']:.2f}s, pycocotools {r['pycocotools_s']:.2f}s, "
                f"ratio {r['ratio']:.3f}x (summary numbers equal to 1e-9)"
            )
        result["cocoeval_only"] = sec
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
