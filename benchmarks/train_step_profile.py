"""Where the time of a training step goes: forward, criterion (matcher + losses), backward, optimiser, EMA.

Runs the engine's own pieces (model, criterion, optimiser groups, EMA, autocast) on random images and
targets that live on the device already, so the data pipeline is out of the picture; ``--data`` adds a
loader-only pass over a real dataset (``--workers`` processes) to compare its images/s with the step's.

    python benchmarks/train_step_profile.py --variant seg-nano --classes 80 [--batch 4] [--steps 20]
        [--data PATH --workers 6] [--profile]

Prints per-phase milliseconds (each phase followed by a device sync), the images/s of an unsynchronised loop
of whole steps, the number of operator calls per step, and with ``--profile`` torch.profiler's top rows.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch


def _targets(batch: int, classes: int, res: int, device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        n = int(torch.randint(1, 15, (1,), generator=g))
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append(
            {
                "labels": torch.randint(0, classes, (n,), generator=g).to(device),
                "boxes": torch.cat([cxcy, wh], 1).to(device),
                "masks": (torch.rand(n, res, res, generator=g) > 0.5).to(device),
            }
        )
    return out


def _upstream_parts(variant: str, classes: int, device):
    """Upstream rfdetr's model and criterion for ``variant`` (random init), and its weighted-sum function."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import rfdetr.config as up_config
    from rfdetr.models import build_criterion_from_config, build_model_from_config

    # upstream keeps num_classes + 1 logit slots; ours keeps `classes`
    from rfdetr_core.weights.files import UPSTREAM_MODEL_NAMES

    model_name = next(name for name, ours in UPSTREAM_MODEL_NAMES.items() if ours == variant)
    cfg = getattr(up_config, model_name + "Config")(
        pretrain_weights=None, device=str(device), num_classes=classes - 1
    )
    torch.manual_seed(0)
    model = build_model_from_config(cfg).to(device).train()
    criterion, _ = build_criterion_from_config(
        cfg, up_config.SegmentationTrainConfig(dataset_dir=".", output_dir=".")
    )
    criterion = criterion.to(device).train()
    weights = criterion.weight_dict

    def total(losses):
        return sum(losses[k] * weights[k] for k in losses if k in weights)

    return model, criterion, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="seg-nano")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=("bf16", "fp16", "no"), default="bf16")
    ap.add_argument("--data", help="also time the training loader alone on this dataset")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--upstream", action="store_true", help="also time upstream rfdetr's model + criterion")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved ours/upstream blocks")
    args = ap.parse_args()

    from rfdetr_core.factory import build_model
    from rfdetr_core.variants import get_variant
    from rfdetr_train.engine.ema import ModelEMA
    from rfdetr_train.engine.optim import OptimSettings, build_optimizer, param_groups
    from rfdetr_train.engine.recipes import FINETUNE
    from rfdetr_train.losses import build_criterion

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    v = get_variant(args.variant)
    res = v.resolution
    torch.manual_seed(0)
    model = build_model(v, num_classes=args.classes).to(device).train()
    criterion = build_criterion(args.classes, v.group_detr, segmentation=v.is_segmentation).to(device)
    recipe = FINETUNE  # the fine-tuning recipe's optimiser, clipping and EMA numbers
    settings = OptimSettings(
        lr=recipe["lr"],
        lr_encoder=recipe["lr_encoder"],
        layer_decay=recipe["lr_vit_layer_decay"],
        component_decay=recipe["lr_component_decay"],
        weight_decay=recipe["weight_decay"],
    )
    opt = build_optimizer(param_groups(model, settings, num_layers=max(v.out_feature_indexes) + 1), device)
    ema = ModelEMA(model, recipe["ema_decay"], recipe["ema_tau"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def amp():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    images = torch.randn(args.batch, 3, res, res, device=device)
    targets = _targets(args.batch, args.classes, res, device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(times: dict | None = None, model=model, criterion=criterion, opt=opt, ema=ema, total_loss=None):
        t = time.perf_counter()

        def lap(name):
            nonlocal t
            if times is not None:
                sync()
                now = time.perf_counter()
                times[name] = times.get(name, 0.0) + now - t
                t = now

        with amp():
            out = model(images)
        lap("forward")
        # ours takes bf16 outputs outside autocast; upstream's criterion must run inside it (as its loop does)
        with amp() if total_loss is not None else contextlib.nullcontext():
            losses = criterion(out, targets)
            loss = (total_loss or criterion.total_loss)(losses)
        lap("criterion")
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        lap("optimizer")
        ema.update(model)
        lap("ema")

    for _ in range(3):
        step()
    sync()
    times: dict = {}
    for _ in range(args.steps):
        step(times)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{args.variant} {res}px batch {args.batch}, {args.classes} classes, {args.amp}, on {name}, torch {torch.__version__}"
    )
    total = sum(times.values())
    for k, s in times.items():
        print(f"  {k:<10} {1000 * s / args.steps:8.1f} ms  ({100 * s / total:4.1f}%)")
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    print(f"  whole step, no syncs: {1000 * dt:.1f} ms = {args.batch / dt:.1f} images/s")
    if cuda:
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        sync()
    top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    print(f"  operator calls per step (top level): {len(top)}")
    if args.profile:
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))

    if args.upstream:
        up_model, up_criterion, up_total = _upstream_parts(args.variant, args.classes, device)
        up_opt = build_optimizer(
            param_groups(up_model, settings, num_layers=max(v.out_feature_indexes) + 1), device
        )
        up_ema = ModelEMA(up_model, recipe["ema_decay"], recipe["ema_tau"])

        def up_step():
            step(model=up_model, criterion=up_criterion, opt=up_opt, ema=up_ema, total_loss=up_total)

        for _ in range(3):
            up_step()
        ratios, peaks = [], {"ours": 0.0, "upstream": 0.0}
        per = max(2, args.steps // 4)
        for _ in range(args.repeats):
            took = {}
            for name, fn in (("ours", step), ("upstream", up_step)):
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(per):
                    fn()
                sync()
                took[name] = (time.perf_counter() - t0) / per
                if cuda:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
            ratios.append(took["ours"] / took["upstream"])
        ratios.sort()
        med = ratios[len(ratios) // 2]
        print(
            f"  ours / upstream {args.variant} training step (model + criterion + backward, same optimiser and "
            f"EMA): median {med:.3f}x over {args.repeats} interleaved blocks of {per} steps "
            f"[min {ratios[0]:.3f}, max {ratios[-1]:.3f}]"
        )
        if cuda:
            print(f"  peak memory: ours {peaks['ours']:.2f} GiB, upstream {peaks['upstream']:.2f} GiB")

    if args.data:
        from rfdetr_core.preprocess import PreprocessConfig
        from rfdetr_train.data import build_train_loader, load_from_config
        from rfdetr_train.data.config import DataConfig

        data = load_from_config(DataConfig(path=args.data), max_instances=v.num_queries)
        loader = build_train_loader(
            data,
            resolution=(res, res),
            size_multiple=v.size_multiple,
            batch_size=args.batch,
            seed=0,
            workers=args.workers,
            transforms="builtin",
            multi_scale=True,
            multi_scale_steps=5,
            preprocess=PreprocessConfig(),
            pin_memory=cuda,
        )
        n, t0 = 0, None
        for i, batch in enumerate(loader):
            if i == 2:
                t0, n = time.perf_counter(), 0
            batch.to(device)
            n += len(batch)
        dt = time.perf_counter() - t0
        print(f"  loader alone ({args.workers} workers): {n / dt:.1f} images/s over {n} images")


if __name__ == "__main__":
    main()
