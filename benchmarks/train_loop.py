"""The whole training loop, ours against upstream rfdetr's own trainer, on the same data, card and call.

Each side trains a randomly initialised model of one variant for about ``--loop-steps`` optimiser steps on the
same images (batch ``B``, no accumulation, bf16, the same loader worker count, each side's default
augmentation and multi-scale) and validates once at the end on ``--val-images`` images. Measured:

- training images/s: steps after the first ``warmup`` over the wall time between them, from a timestamp taken
  on the host each time the criterion runs in training mode (once per step on both sides, so data loading,
  optimiser, EMA and logging are all inside the interval; validation is not);
- the wall time of that validation (inference, post-processing and COCO evaluation; not checkpoint writing).

Upstream runs through ``RFDETRSeg*.train()`` (PyTorch Lightning, its own data pipeline and COCO evaluation),
with tensorboard off and its periodic checkpoints pushed past the run. Each side runs in its own process
(``--loop-side``) so neither sees the other's memory or compiled kernels.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def prepare(source: Path, dest: Path, val_images: int, train_images: int | None = None) -> tuple[Path, Path]:
    """Write the two layouts of one split: ours (split JSONs) and upstream's Roboflow COCO folders.

    Train = the source's ``train.json``; validation = the first ``val_images`` images of ``annotations.json``
    (so a validation covers that many images even though the source's own val split is smaller).
    """
    train = json.loads((source / "train.json").read_text())
    if train_images:
        train["images"] = train["images"][:train_images]
        kept = {img["id"] for img in train["images"]}
        train["annotations"] = [a for a in train["annotations"] if a["image_id"] in kept]
    full = json.loads((source / "annotations.json").read_text())
    keep = {img["id"] for img in full["images"][:val_images]}
    val = dict(full, images=full["images"][:val_images])
    val["annotations"] = [a for a in full["annotations"] if a["image_id"] in keep]
    ours = dest / "ours"
    ours.mkdir(parents=True, exist_ok=True)
    if not (ours / "images").exists():
        (ours / "images").symlink_to((source / "images").resolve())
    for name, split in (("train.json", train), ("val.json", val)):
        (ours / name).write_text(json.dumps(split))
    upstream = dest / "upstream"
    for folder, split in (("train", train), ("valid", val), ("test", val)):
        out = upstream / folder
        out.mkdir(parents=True, exist_ok=True)
        images = []
        for img in split["images"]:
            src = (source / img["file_name"]).resolve()
            link = out / src.name
            if not link.exists():
                link.symlink_to(src)
            images.append(dict(img, file_name=src.name))
        (out / "_annotations.coco.json").write_text(json.dumps(dict(split, images=images)))
    return ours, upstream


class Clock:
    """Host timestamps of training-mode criterion calls and the wall time of each validation."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.validations: list[float] = []

    def wrap_criterion(self, cls) -> None:
        forward = cls.forward
        clock = self

        def timed(module, *args, **kwargs):
            if module.training:
                clock.steps.append(time.perf_counter())
            return forward(module, *args, **kwargs)

        cls.forward = timed

    def summary(self, batch: int, warmup: int) -> dict:
        n = len(self.steps)
        if n <= warmup + 1:
            return {"steps": n, "images_per_s": float("nan")}
        span = self.steps[-1] - self.steps[warmup]
        return {
            "steps": n,
            "timed_steps": n - 1 - warmup,
            "images_per_s": (n - 1 - warmup) * batch / span,
            "validation_s": self.validations,
        }


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(data: Path, args, out: Path) -> dict:
    import rfdetr_train
    import rfdetr_train.engine.trainer as trainer_mod
    from rfdetr_train.losses.criterion import SetCriterion

    clock = Clock()
    clock.wrap_criterion(SetCriterion)
    evaluate = trainer_mod.evaluate

    def timed_evaluate(*a, **k):
        _sync()
        t0 = time.perf_counter()
        report = evaluate(*a, **k)
        _sync()
        clock.validations.append(time.perf_counter() - t0)
        return report

    trainer_mod.evaluate = timed_evaluate
    t0 = time.perf_counter()
    rfdetr_train.train(
        data=str(data),
        model=args.variant,
        weights="none",  # random init, like upstream's side (and no download on the GPU machine)
        recipe="finetune",  # upstream's fine-tuning numbers, what its trainer defaults to
        steps=args.loop_steps,
        batch_size=args.batch,
        grad_accum=1,
        workers=args.workers,
        steps_per_validation=args.loop_steps,
        mixed_precision=args.amp,
        compile=args.compile or None,
        output=str(out / "runs"),
        progress=False,
        log_every=50,
    )
    result = clock.summary(args.batch, args.warmup)
    result["wall_s"] = time.perf_counter() - t0
    return result


def run_upstream(data: Path, args, out: Path) -> dict:
    import pytorch_lightning as pl
    import rfdetr
    from rfdetr.models.criterion import SetCriterion

    from rfdetr_core.weights.files import UPSTREAM_MODEL_NAMES

    clock = Clock()
    clock.wrap_criterion(SetCriterion)

    class ValidationClock(pl.Callback):
        def on_validation_epoch_start(self, trainer, module):
            _sync()
            self.t0 = time.perf_counter()

        def on_validation_epoch_end(self, trainer, module):
            _sync()
            clock.validations.append(time.perf_counter() - self.t0)

    init = pl.Trainer.__init__

    def with_clock(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [ValidationClock()]
        init(self, *a, **k)

    pl.Trainer.__init__ = with_clock
    name = next(up for up, ours in UPSTREAM_MODEL_NAMES.items() if ours == args.variant)
    model = getattr(rfdetr, name)(pretrain_weights=None)
    train_images = len(json.loads((data / "train" / "_annotations.coco.json").read_text())["images"])
    epochs = math.ceil(args.loop_steps / max(1, train_images // args.batch))
    t0 = time.perf_counter()
    model.train(
        dataset_dir=str(data),
        epochs=epochs,
        batch_size=args.batch,
        grad_accum_steps=1,
        num_workers=args.workers,
        output_dir=str(out / "upstream_run"),
        tensorboard=False,
        eval_interval=epochs,
        checkpoint_interval=epochs + 1,
        device="cuda" if args.device == "cuda" else args.device,
        progress_bar=None,
    )
    result = clock.summary(args.batch, args.warmup)
    result["wall_s"] = time.perf_counter() - t0
    result["epochs"] = epochs
    return result


def side_main(args) -> None:
    """One side in this process; prints one ``LOOP_RESULT {json}`` line."""
    out = Path(args.loop_out)
    ours_dir, upstream_dir = out / "data" / "ours", out / "data" / "upstream"
    fn = run_ours if args.loop_side == "ours" else run_upstream
    result = fn(ours_dir if args.loop_side == "ours" else upstream_dir, args, out)
    result.update(side=args.loop_side, variant=args.variant, batch=args.batch, compile=bool(args.compile))
    print("LOOP_RESULT " + json.dumps(result), flush=True)


def compare(args) -> list[dict]:
    """Prepare the data, run each side in a subprocess (ours first), print and return both results."""
    out = Path(args.loop_out)
    prepare(Path(args.data), out / "data", args.val_images, args.train_images)
    results = []
    sides = (
        ["ours"] + (["ours-compile"] if args.loop_compile else []) + (["upstream"] if args.upstream else [])
    )
    for side in sides:
        cmd = [sys.executable, os.path.abspath(sys.argv[0]), "--loop-side", side.split("-")[0]]
        cmd += ["--variant", args.variant, "--batch", str(args.batch), "--data", args.data]
        cmd += ["--loop-steps", str(args.loop_steps), "--workers", str(args.workers), "--amp", args.amp]
        cmd += ["--loop-out", str(out), "--val-images", str(args.val_images), "--warmup", str(args.warmup)]
        cmd += ["--device", args.device] + (["--compile"] if side == "ours-compile" else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.loop_timeout)
        (out / f"loop_{side}.log").write_text(proc.stdout + proc.stderr)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("LOOP_RESULT ")), None)
        if line is None:
            print(
                f"  loop {side}: failed (rc {proc.returncode}); tail:\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
            results.append({"side": side, "failed": True, "rc": proc.returncode})
            continue
        result = json.loads(line[len("LOOP_RESULT ") :])
        result["side"], result["process_s"] = side, time.perf_counter() - t0
        results.append(result)
        val = result.get("validation_s") or [float("nan")]
        print(
            f"  loop {side}: {result['images_per_s']:.1f} images/s over {result.get('timed_steps')} steps, "
            f"validation of {args.val_images} images {val[-1]:.1f} s, process {result['process_s']:.0f} s"
        )
    by = {r["side"]: r for r in results if not r.get("failed")}
    if "upstream" in by:
        for side in [s for s in by if s != "upstream"]:
            ratio = by[side]["images_per_s"] / by["upstream"]["images_per_s"]
            vratio = (by[side].get("validation_s") or [math.nan])[-1] / (
                by["upstream"].get("validation_s") or [math.nan]
            )[-1]
            print(f"  loop {side} / upstream: images/s {ratio:.2f}x, validation time {vratio:.2f}x")
    return results
