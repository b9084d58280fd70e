"""Training-step speed and memory, ours against upstream rfdetr in the same process; and the whole loop.

Step mode (default) runs the engine's own pieces (model, criterion, optimiser groups, EMA, autocast) on random
images and targets that live on the device already, so the data pipeline is out of the picture:

    python benchmarks/train_step_profile.py --variant seg-nano,seg-medium,seg-large --batch 8,16 --upstream
        [--modes eager,compile,compile-graphs,checkpointing] [--steps 12 --repeats 5] [--phases] [--profile]
        [--json OUT.json] [--data PATH --workers 6]

For every (variant, batch) it warms each of our modes and upstream up (compiling where the mode compiles, the
seconds and graph count reported), then times interleaved blocks of whole steps (forward, criterion, backward,
clipping, the same fused AdamW and EMA for both sides) and prints the median images/s of each mode and its
ratio to upstream. Peak memory of a side = its own persistent memory (weights, optimiser state, EMA copy) + the
transient peak of its steps + for CUDA-graph modes the whole of the graph pools it replays into (a replay writes
into its pool without asking the caching allocator, so ``max_memory_allocated`` sees only the pool's allocated
blocks: the rest, ``reserved - allocated`` of those pools, is added; until 2026-12-04 it was not, and the
compile-graphs peaks recorded before then are too low), so the models living side by side in one process do
not count against each other. torch's CUDA-graph trees keep one pool per device for every compiled function, so
a second CUDA-graph mode in the same call replays into the first one's pool: the peak of each then counts that
whole shared pool (an upper bound, grown to what either needed; ``graph_pool_shared_with`` in the JSON), and only
a mode run alone gives its own. Until 2026-12-08 the second mode counted no pool at all (its peak was far too low:
seg-medium ``compile-graphs-losses`` 1.23 GiB on the H100 that morning). Modes: ``eager``; ``compile`` (``torch.compile`` of the model forward);
``compile-graphs`` (the same with CUDA graphs, ``mode="reduce-overhead"``); ``checkpointing`` (eager with
backbone activation checkpointing); ``compile-graphs-checkpointing`` (CUDA graphs with checkpointing compiled
in; it must be the only mode of its call, since the flag is part of what the compiled graph assumes);
``compile-graphs-losses`` (``compile-graphs`` with the criterion's batched loss pass compiled too,
``SetCriterion(compile_losses=True)``; its own criterion, the same weights and matcher settings).
``--memory-budget B`` sets the compiled graphs' activation memory budget (recompute instead of save);
``--emulate-casts`` sets inductor's ``emulate_precision_casts`` (fused kernels round low-precision intermediates as
eager does), to see how much of a compiled mode's probe-loss distance to eager bf16 is fused rounding (on CPU,
seg-nano batch 2, 2026-12-08: 7.5e-4 without, 7.2e-4 with, on different random images: no clear effect).
``--memory-trace`` (CUDA) takes one more step per side with the allocator's history recorded and prints, by
allocating source line, the blocks allocated during the step that were alive when the step's allocations peaked
(what a lower peak has to remove; graph pools and persistent memory are not in it). ``--phases`` adds the
per-phase milliseconds of each mode's step (a synchronisation at every phase boundary, so
the phases of the CUDA-graph mode include the GPU time each waits for); ``--syncs`` (CUDA) counts the host
synchronisations of one step per mode by source line. On CUDA every side also takes one step with
the allocator's peak taken per phase (``phase_peak_gib``: forward, criterion, backward, optimizer, ema), which
says where the step's peak is.

Before any step, every mode (and upstream) takes one probe step from the same initial weights on the same
batch and seed (forward, criterion, backward; no optimiser step): its total loss and gradient norm, and
their relative difference to our eager step's, are printed and kept (``probe`` in the JSON). Under ``--amp`` an
``eager-fp32`` probe (the same step without autocast) is added, and every probe's difference to it is printed
too: the scale of the mixed-precision rounding itself.

Loop mode (``--loop``, see ``benchmarks/train_loop.py``) trains through each side's own trainer on a real
dataset and reports images/s over the run and the time of one validation:

    python benchmarks/train_step_profile.py --loop --data .data/coco128_seg --variant seg-medium --batch 8
        --loop-steps 300 --val-images 100 --workers 8 --upstream [--loop-compile] --loop-out OUT_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time

import torch
import torch._functorch.config  # the activation memory budget (--memory-budget)
import torch._inductor.config  # --emulate-casts


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


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Side:
    """One model + criterion + optimiser + EMA and the step that trains it (one mode of ours, or upstream)."""

    def __init__(self, name, model, criterion, total_loss, forward, opt, ema, amp, clip, graphs=False):
        self.name, self.model, self.criterion, self.total_loss = name, model, criterion, total_loss
        self.forward, self.opt, self.ema, self.amp, self.clip, self.graphs = (
            forward,
            opt,
            ema,
            amp,
            clip,
            graphs,
        )
        self.before_ckpt = None  # callables run around the step (checkpointing mode)
        self.after_ckpt = None
        self.persistent = 0  # bytes this side holds between steps
        self.pools: set = set()  # ids of the CUDA-graph memory pools this side replays into
        self.times: list[float] = []
        self.peaks: list[float] = []

    def outputs(self, images):
        """The training forward of ``images`` under this side's autocast."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.amp():
            return self.forward(images)

    def loss_of(self, out, targets, matches=None):
        """The weighted total loss of ``out`` (ours: with precomputed ``matches`` when given)."""
        if self.total_loss is not None:
            # upstream's criterion must run inside autocast (as its loop does); ours takes bf16 outputs outside
            with self.amp():
                return self.total_loss(self.criterion(out, targets))
        return self.criterion.total_loss(self.criterion(out, targets, matches=matches))

    def step(self, images, targets, laps=None, sync=None, peaks=None) -> None:
        """One training step; ``laps`` (with ``sync``) adds each phase's seconds, ``peaks`` (CUDA) records each
        phase's allocator peak in bytes (the peak statistics are reset at every phase boundary)."""
        t = time.perf_counter()
        if peaks is not None:
            torch.cuda.reset_peak_memory_stats()

        def lap(name):
            nonlocal t
            if laps is not None:
                sync()
                now = time.perf_counter()
                laps[name] = laps.get(name, 0.0) + now - t
                t = now
            if peaks is not None:
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()

        if self.before_ckpt:
            self.before_ckpt()
        out = self.outputs(images)
        lap("forward")
        loss = self.loss_of(out, targets)
        lap("criterion")
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lap("optimizer")
        self.ema.update(self.model)
        lap("ema")
        if self.after_ckpt:
            self.after_ckpt()


class _SharedPoints:
    """Probe loss points: the same uniform points for every mask, so the loss does not depend on the order of
    the matched pairs (``(mask_logits [M, 1, h, w], num_points) -> [M, num_points, 2]``)."""

    # Drawn once on the host from a fixed seed, not inside the step: a compiled loss pass (compile-graphs-losses)
    # draws its random numbers with inductor's generator, which would give it other points than eager's.
    table = torch.rand(1, 4096, 2, generator=torch.Generator().manual_seed(4321))

    def __call__(self, mask_logits, num_points):
        if num_points > self.table.shape[1]:
            raise ValueError(f"the probe has {self.table.shape[1]} shared points, {num_points} were asked for")
        points = self.table[:, :num_points].to(mask_logits.device)  # [1, P, 2]
        return points.expand(mask_logits.shape[0], num_points, 2)


def _sync_sites(side: Side, images, targets) -> dict[str, int]:
    """Host synchronisations of one CUDA step of ``side``, counted by where they happen: ``{"file:line function":
    count}`` at the innermost frame of our packages (else of any Python code), from
    ``torch.cuda.set_sync_debug_mode("warn")``. A synchronisation stops the host from queueing work ahead of the
    GPU: in the CUDA-graph mode the eager criterion then waits for the replayed forward instead of overlapping it."""
    import threading
    import traceback
    import warnings

    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        # only torch's sync-debug warning ("called a synchronizing CUDA operation"): an H200 run counted a warning
        # that set_sync_debug_mode itself raised as a second synchronisation of the step
        if "synchronizing CUDA operation" not in str(message):
            return
        # the warning machinery's own frames say nothing; a sync raised in the autograd engine's thread (a C++
        # backward node) has no Python frame at all, so the thread is named
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        ours = [f for f in stack if "rfdetr_" in f.filename]
        if ours:
            frame = ours[-1]
            where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
        elif stack:  # outside our packages: the three innermost frames
            where = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in stack[::-1][:3])
        else:
            where = f"no Python frame (thread {threading.current_thread().name}, e.g. a C++ backward node)"
        sites[where] = sites.get(where, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            side.step(images, targets)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def _probe(side: Side, images, targets, initial: dict, sync) -> dict:
    """One step's loss and gradient norm from ``initial`` weights (no optimiser step).

    Every side matches its own outputs, from the same seed, and (ours) takes its mask-loss points from
    ``_SharedPoints`` drawn from the same seed right before the loss. The loss is then independent of the order
    of the decoder's queries: under bf16 the two-stage top-k proposal order (and so the query index of a
    prediction) flips between eager and compiled kernels on near-ties of bf16 scores, and a comparison with the
    eager side's matches (by query index) or with per-mask points measured those flips, not the numerics.
    """
    side.model.load_state_dict(initial)
    side.opt.zero_grad(set_to_none=True)
    if side.before_ckpt:
        side.before_ckpt()
    out = side.outputs(images)
    torch.manual_seed(1234)  # ours: the matcher's mask-cost points; upstream: all of its own draws
    if side.total_loss is not None:  # upstream: its own criterion and sampling
        loss = side.loss_of(out, targets)
    else:
        matches = side.criterion.match(out, targets)
        sampler = side.criterion.point_sampler
        side.criterion.point_sampler = _SharedPoints()
        torch.manual_seed(4321)
        try:
            loss = side.loss_of(out, targets, matches)
        finally:
            side.criterion.point_sampler = sampler
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(side.model.parameters(), float("inf"))
    sync()
    if side.after_ckpt:
        side.after_ckpt()
    side.opt.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}


def _site(frames: list[dict]) -> str:
    """Where an allocation was made: the innermost frame in rfdetr code (ours or upstream's), else the innermost
    Python frame, as ``file:line function``."""
    python = [f for f in frames if str(f.get("filename", "")).endswith(".py")]
    for frame in python:
        name = str(frame["filename"])
        if "rfdetr" in name:
            return f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{frame['line']} {frame['name']}"
    if python:
        return f"{python[0]['filename'].rsplit('/', 1)[-1]}:{python[0]['line']} {python[0]['name']}"
    return "?"


def peak_live_blocks(trace: list[dict], top: int = 15) -> dict:
    """Replay a CUDA allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``: ``alloc`` and
    ``free_requested``/``free_completed`` events with an address, a size and the allocating frames) and return the
    moment the bytes allocated during the trace peaked: ``{"peak_mib": bytes alive then that were allocated during
    the trace, "sites": [[MiB, site, blocks], ...] (largest first, ``top`` of them)}``. Blocks allocated before the
    trace began (weights, optimiser state, graph pools) are not in it; replays of CUDA graphs allocate nothing."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in trace:
        action, addr = event.get("action"), event.get("addr")
        if action == "alloc":
            live[addr] = (int(event["size"]), _site(event.get("frames", [])))
            total += int(event["size"])
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action in ("free_requested", "free_completed") and addr in live:
            total -= live.pop(addr)[0]
    by_site: dict[str, list[int]] = {}
    for size, site in at_peak.values():
        entry = by_site.setdefault(site, [0, 0])
        entry[0] += size
        entry[1] += 1
    ranked = sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_mib": peak / 2**20, "sites": [[v[0] / 2**20, k, v[1]] for k, v in ranked]}


def _traced_step(side: Side, images, targets) -> dict:
    """One step of ``side`` with the CUDA allocator's history recorded: :func:`peak_live_blocks` of it."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=500_000, context="alloc", stacks="python")
    try:
        side.step(images, targets)
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return peak_live_blocks(snapshot["device_traces"][torch.cuda.current_device()])


def _allocated(cuda: bool) -> int:
    return torch.cuda.memory_allocated() if cuda else 0


def _pool_ids() -> set:
    from rfdetr_core.cuda_graphs import graph_pools

    return set(graph_pools())


def _pool_unallocated(side: Side) -> int:
    """Bytes of ``side``'s graph pools that the allocator counts as free (the replay uses them)."""
    from rfdetr_core.cuda_graphs import graph_pools

    return sum(reserved - allocated for pool, (reserved, allocated) in graph_pools().items() if pool in side.pools)


def measure(variant_name: str, batch: int, args, device) -> dict:
    """All modes of ours and upstream for one (variant, batch); returns the result row."""
    from rfdetr_core.factory import build_model
    from rfdetr_core.variants import get_variant
    from rfdetr_train.engine.ema import ModelEMA
    from rfdetr_train.engine.optim import OptimSettings, build_optimizer, param_groups
    from rfdetr_train.engine.recipes import FINETUNE
    from rfdetr_train.losses import build_criterion

    cuda = device.type == "cuda"
    v = get_variant(variant_name)
    res = v.resolution
    recipe = FINETUNE  # the fine-tuning recipe's optimiser, clipping and EMA numbers
    settings = OptimSettings(
        lr=recipe["lr"],
        lr_encoder=recipe["lr_encoder"],
        layer_decay=recipe["lr_vit_layer_decay"],
        component_decay=recipe["lr_component_decay"],
        weight_decay=recipe["weight_decay"],
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def amp():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def optimiser(model):
        return build_optimizer(
            param_groups(model, settings, num_layers=max(v.out_feature_indexes) + 1), device
        )

    # seeded, so calls (and processes) see the same batch: until 2026-12-08 the images were drawn from the global
    # generator before any seed, and probe losses of two processes differed by their images
    images = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(device)
    targets = _targets(batch, args.classes, res, device)
    row: dict = {
        "variant": variant_name,
        "resolution": res,
        "batch": batch,
        "amp": args.amp,
        "activation_memory_budget": torch._functorch.config.activation_memory_budget,
        "emulate_precision_casts": bool(args.emulate_casts),
        "modes": {},
    }
    sides: list[Side] = []

    base = _allocated(cuda)
    torch.manual_seed(0)
    model = build_model(v, num_classes=args.classes).to(device).train()
    criterion = build_criterion(args.classes, v.group_detr, segmentation=v.is_segmentation).to(device)
    opt, ema = optimiser(model), ModelEMA(model, recipe["ema_decay"], recipe["ema_tau"])
    ours_held = _allocated(cuda) - base
    clip = recipe["clip_grad_norm"]
    opt_held = None  # the optimiser state, created by the first warm-up
    if "compile-graphs-checkpointing" in args.modes:
        if len(args.modes) > 1:
            raise SystemExit("compile-graphs-checkpointing must be the only mode of its call")
        model.set_grad_checkpointing(True)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ours_sides: list[Side] = []
    for mode in args.modes:
        graphs = mode in ("compile-graphs", "compile-graphs-checkpointing", "compile-graphs-losses")
        if mode == "compile":
            forward = torch.compile(model, dynamic=False)
        elif graphs:
            forward = torch.compile(model, dynamic=False, mode="reduce-overhead")
        elif mode in ("eager", "checkpointing"):
            forward = model
        else:
            raise SystemExit(
                f"unknown mode {mode!r}; use eager, compile, compile-graphs, compile-graphs-losses, checkpointing "
                "or compile-graphs-checkpointing"
            )
        side_criterion = criterion
        if mode == "compile-graphs-losses":
            side_criterion = build_criterion(
                args.classes, v.group_detr, segmentation=v.is_segmentation, compile_losses=True
            ).to(device)
            # the compiled pass is the layer-batched one, which the criterion takes by default on CUDA only (until
            # 2026-12-08 this mode on the CPU ran the per-layer eager criterion: nothing was compiled)
            side_criterion.batch_layers = True
        side = Side(mode, model, side_criterion, None, forward, opt, ema, amp, clip, graphs=graphs)
        if mode == "checkpointing":
            side.before_ckpt = lambda m=model: m.set_grad_checkpointing(True)
            side.after_ckpt = lambda m=model: m.set_grad_checkpointing(False)
        ours_sides.append(side)
    # Probe steps: same weights, batch and seed for every mode (the compiled modes compile here).
    reference = Side("eager", model, criterion, None, model, opt, ema, amp, clip)
    row["probe"] = {"eager": _probe(reference, images, targets, initial, sync)}
    if dtype is not None:
        # the same step in float32: how far eager's own bf16/fp16 rounding moves the loss, the scale against
        # which the compiled modes' differences to eager are read
        full = Side("eager-fp32", model, criterion, None, model, opt, ema, contextlib.nullcontext, clip)
        row["probe"]["eager-fp32"] = _probe(full, images, targets, initial, sync)
    probe_s, probe_graphs = {}, {}
    for side in ours_sides:
        t0, g0, pools = time.perf_counter(), _graph_count(), _pool_ids()
        try:
            row["probe"][side.name] = _probe(side, images, targets, initial, sync)
        except Exception as exc:
            print(f"  {variant_name} b{batch} {side.name} probe: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        side.pools |= _pool_ids() - pools
        probe_s[side.name] = time.perf_counter() - t0
        probe_graphs[side.name] = _graph_count() - g0
    model.load_state_dict(initial)
    for side in ours_sides:
        mode = side.name
        sync()
        before, graphs_before, t0, pools = _allocated(cuda), _graph_count(), time.perf_counter(), _pool_ids()
        try:
            for _ in range(args.warmup_steps):
                side.step(images, targets)
            sync()
            # its own new pools, and for a CUDA-graph mode every pool alive now: the graph trees' per-device pool
            # that an earlier CUDA-graph mode made is the one this mode replays into as well
            side.pools |= _pool_ids() if side.graphs else _pool_ids() - pools
        except Exception as exc:  # a mode that fails is reported, the others still run
            row["modes"][mode] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(
                f"  {variant_name} b{batch} {mode}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True
            )
            continue
        held = _allocated(cuda) - before  # optimiser state on the first warm-up; live graph outputs on later ones
        if opt_held is None:
            opt_held, held = held, 0
        side.persistent = ours_held + opt_held + held
        row["modes"][mode] = {
            "warmup_s": time.perf_counter() - t0 + probe_s.get(mode, 0.0),
            "graphs_compiled": _graph_count() - graphs_before + probe_graphs.get(mode, 0),
            "graph_pool_unallocated_gib": _pool_unallocated(side) / 2**30,  # counted in its peak
        }
        sides.append(side)
    for side in sides:  # after every warm-up: a shared pool holds what each of its modes needed
        shared = [other.name for other in sides if other is not side and other.pools & side.pools]
        if shared:  # its peak counts the whole shared pool: an upper bound (module docstring)
            row["modes"][side.name]["graph_pool_shared_with"] = shared

    if args.phases:  # every mode of ours that warmed up: where its step's time goes
        row["phases_ms"] = {}
        for side in sides:
            laps: dict = {}
            for _ in range(args.steps):
                side.step(images, targets, laps, sync)
            row["phases_ms"][side.name] = {k: 1000 * s / args.steps for k, s in laps.items()}
    if args.syncs and cuda:
        row["sync_sites"] = {side.name: _sync_sites(side, images, targets) for side in sides}

    if args.upstream:
        base = _allocated(cuda)
        up_model, up_criterion, up_total = _upstream_parts(variant_name, args.classes, device)
        up_opt = optimiser(up_model)
        up_ema = ModelEMA(up_model, recipe["ema_decay"], recipe["ema_tau"])
        up = Side("upstream", up_model, up_criterion, up_total, up_model, up_opt, up_ema, amp, clip)
        try:
            up_initial = {k: v.detach().clone() for k, v in up_model.state_dict().items()}
            row["probe"]["upstream"] = _probe(up, images, targets, up_initial, sync)
            for _ in range(args.warmup_steps):
                up.step(images, targets)
            sync()
            up.persistent = _allocated(cuda) - base
            sides.append(up)
        except Exception as exc:
            row["upstream_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"  {variant_name} b{batch} upstream: FAILED {row['upstream_failed']}", flush=True)

    graphs_before_timing = _graph_count()
    per = max(2, args.steps // 4)
    for _ in range(args.repeats):
        for side in sides:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = _allocated(cuda)
            t0 = time.perf_counter()
            for _ in range(per):
                side.step(images, targets)
            sync()
            side.times.append((time.perf_counter() - t0) / per)
            if cuda:
                peak = side.persistent + torch.cuda.max_memory_allocated() - start + _pool_unallocated(side)
                side.peaks.append(peak / 2**30)

    row["graphs_compiled_while_timing"] = _graph_count() - graphs_before_timing  # recompiles: > 0 is a flaw
    if cuda:
        # Where each side's peak is: one more step with the allocator's peak taken per phase, counted like the
        # timed peaks (persistent memory + allocations beyond the step's start + the side's unallocated pools).
        for side in sides:
            sync()
            peaks: dict = {}
            start = _allocated(cuda)
            side.step(images, targets, peaks=peaks)
            sync()
            extra = side.persistent - start + _pool_unallocated(side)
            entry = row.setdefault("phase_peak_gib", {})
            entry[side.name] = {k: (v + extra) / 2**30 for k, v in peaks.items()}
            print(f"  {side.name} peak by phase (GiB): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in entry[side.name].items()), flush=True)
        for side in sides if args.memory_trace else ():
            traced = _traced_step(side, images, targets)
            row.setdefault("peak_live_blocks", {})[side.name] = traced
            print(f"  {side.name}: {traced['peak_mib']:.0f} MiB allocated during the step were alive at its peak:")
            for mib, site, blocks in traced["sites"]:
                print(f"      {mib:8.1f} MiB  {blocks:4d} blocks  {site}", flush=True)
    up_ips = None
    for side in sides:
        t = sorted(side.times)[len(side.times) // 2]
        if side.name == "upstream":
            row["upstream"] = {}
        entry = row["upstream"] if side.name == "upstream" else row["modes"][side.name]
        entry.update(
            step_ms=1000 * t,
            images_per_s=batch / t,
            step_ms_all=[1000 * x for x in side.times],
            peak_gib=max(side.peaks) if side.peaks else None,
        )
        if side.name == "upstream":
            up_ips = batch / t
    if up_ips:
        for side in sides:
            if side.name != "upstream":
                row["modes"][side.name]["speed_vs_upstream"] = (
                    row["modes"][side.name]["images_per_s"] / up_ips
                )
                if cuda:
                    row["modes"][side.name]["memory_vs_upstream"] = (
                        row["modes"][side.name]["peak_gib"] / row["upstream"]["peak_gib"]
                    )
    _print_row(row)

    if args.profile and sides:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for side in sides:
            with profile(activities=acts) as prof:
                side.step(images, targets)
                sync()
            events = prof.events()
            top = [e for e in events if e.cpu_parent is None and e.name.startswith("aten::")]
            row.setdefault("operator_calls", {})[side.name] = len(top)
            line = f"  {side.name}: {len(top)} top-level operator calls per step"
            if cuda:
                # how host-bound the step is: kernel launches from the host, and the GPU's busy time (the sum of
                # its kernels' durations) against the step's wall time; the time in kernels is without overlap
                launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC"))
                graphs = sum(1 for e in events if e.name == "cudaGraphLaunch")
                busy_ms = sum(
                    e.time_range.elapsed_us() for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                ) / 1e3
                wall_ms = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / 1e3
                row.setdefault("gpu_profile", {})[side.name] = {
                    "kernel_launches": launches, "graph_launches": graphs, "gpu_busy_ms": busy_ms, "wall_ms": wall_ms
                }
                line += (
                    f", {launches} kernel launches + {graphs} graph launches, GPU busy {busy_ms:.1f} ms of"
                    f" {wall_ms:.1f} ms (profiled)"
                )
            print(line)
    del sides, model, criterion, opt, ema
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def _print_row(row: dict) -> None:
    head = f"{row['variant']} {row['resolution']}px batch {row['batch']} {row['amp']}"
    up = row.get("upstream")
    if up:
        print(f"  {head} upstream: {up['images_per_s']:.1f} images/s, peak {up['peak_gib'] or 0:.2f} GiB")
    for mode, m in row["modes"].items():
        if "failed" in m:
            continue
        ratio = f", {m['speed_vs_upstream']:.2f}x upstream" if "speed_vs_upstream" in m else ""
        mem = f" ({m['memory_vs_upstream']:.2f}x)" if "memory_vs_upstream" in m else ""
        peak = f", peak {m['peak_gib']:.2f} GiB{mem}" if m.get("peak_gib") is not None else ""
        print(
            f"  {head} {mode}: {m['images_per_s']:.1f} images/s{ratio}{peak}; warm-up {m['warmup_s']:.0f} s, "
            f"{m['graphs_compiled']} graphs" + (
                f" (pools: {m['graph_pool_unallocated_gib']:.2f} GiB beyond the allocator's count, in the peak)"
                if m.get("graph_pool_unallocated_gib") else ""
            ) + (
                f"; graph pool shared with {', '.join(m['graph_pool_shared_with'])}: the peak is an upper bound"
                if m.get("graph_pool_shared_with") else ""
            ),
            flush=True,
        )
    if row.get("graphs_compiled_while_timing"):
        print(f"  WARNING: {row['graphs_compiled_while_timing']} graphs compiled during the timed blocks")
    probe = row.get("probe", {})
    ref, full = probe.get("eager"), probe.get("eager-fp32")
    for name, p in probe.items():
        if full and name not in ("eager-fp32", "upstream"):
            p["loss_rel_diff_fp32"] = abs(p["loss"] - full["loss"]) / abs(full["loss"])
        to_fp32 = f", to eager float32 {p['loss_rel_diff_fp32']:.1e}" if "loss_rel_diff_fp32" in p else ""
        if ref and name not in ("eager", "eager-fp32", "upstream"):  # upstream: other weights and random draws
            p["loss_rel_diff"] = abs(p["loss"] - ref["loss"]) / abs(ref["loss"])
            p["grad_norm_rel_diff"] = abs(p["grad_norm"] - ref["grad_norm"]) / abs(ref["grad_norm"])
            print(
                f"  probe {name}: loss {p['loss']:.6f} (rel. diff to eager {p['loss_rel_diff']:.1e}{to_fp32}), "
                f"grad norm {p['grad_norm']:.4f} ({p['grad_norm_rel_diff']:.1e})"
            )
        elif to_fp32:
            print(f"  probe {name}: loss {p['loss']:.6f} ({to_fp32[2:]}), grad norm {p['grad_norm']:.4f}")
        else:
            print(f"  probe {name}: loss {p['loss']:.6f}, grad norm {p['grad_norm']:.4f}")
    for mode, phases in row.get("phases_ms", {}).items():
        print(f"  {mode} phases (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    for mode, sites in row.get("sync_sites", {}).items():
        print(f"  {mode}: {sum(sites.values())} host synchronisations in one step")
        for where, n in sorted(sites.items(), key=lambda kv: -kv[1]):
            print(f"    {n:4d}  {where}")


def _loader_pass(args, device) -> None:
    from rfdetr_core.preprocess import PreprocessConfig
    from rfdetr_core.variants import get_variant
    from rfdetr_train.data import build_train_loader, load_from_config
    from rfdetr_train.data.config import DataConfig

    v = get_variant(args.variant[0])
    res = v.resolution
    data = load_from_config(DataConfig(path=args.data), max_instances=v.num_queries)
    loader = build_train_loader(
        data,
        resolution=(res, res),
        size_multiple=v.size_multiple,
        batch_size=args.batch[0],
        seed=0,
        workers=args.workers,
        transforms="builtin",
        multi_scale=True,
        multi_scale_steps=5,
        preprocess=PreprocessConfig(),
        pin_memory=device.type == "cuda",
    )
    n, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == 2:
            t0, n = time.perf_counter(), 0
        batch.to(device)
        n += len(batch)
    dt = time.perf_counter() - t0
    print(f"  loader alone ({args.workers} workers): {n / dt:.1f} images/s over {n} images")


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", type=_csv(str), default=["seg-nano"], help="comma-separated variants")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--batch", type=_csv(int), default=[4], help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--warmup-steps", type=int, default=3, help="untimed whole steps per side after its probe step"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=("bf16", "fp16", "no"), default="bf16")
    ap.add_argument(
        "--modes", type=_csv(str), default=["eager"], help="eager,compile,compile-graphs,compile-graphs-losses,checkpointing"
    )
    ap.add_argument(
        "--data", help="also time the training loader alone on this dataset (loop mode: the data)"
    )
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--profile", action="store_true", help="operator calls per step of every side")
    ap.add_argument("--phases", action="store_true", help="per-phase milliseconds of each mode's step")
    ap.add_argument(
        "--memory-trace",
        action="store_true",
        help="CUDA: one more step per side with the allocator's history recorded; prints what was alive at its peak",
    )
    ap.add_argument(
        "--syncs", action="store_true", help="CUDA: host synchronisations of one step per mode, by source line"
    )
    ap.add_argument("--upstream", action="store_true", help="also time upstream rfdetr's model + criterion")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved blocks")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--loop", action="store_true", help="whole-loop mode (benchmarks/train_loop.py)")
    ap.add_argument("--loop-side", choices=("ours", "upstream"), help=argparse.SUPPRESS)
    ap.add_argument("--loop-steps", type=int, default=300)
    ap.add_argument("--loop-out", default="out/train_loop")
    ap.add_argument("--loop-compile", action="store_true", help="loop mode: also ours with --compile")
    ap.add_argument("--loop-timeout", type=int, default=400, help="seconds per side in loop mode")
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--memory-budget",
        type=float,
        help="compiled modes: torch._functorch.config.activation_memory_budget (1.0 = keep every activation "
        "the partitioner would; lower values recompute the cheapest ones in the backward)",
    )
    ap.add_argument(
        "--emulate-casts",
        action="store_true",
        help="compiled modes: torch._inductor.config.emulate_precision_casts (round low-precision intermediates "
        "of fused kernels as eager does, so compiled bf16 losses track eager bf16's more closely)",
    )
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--train-images", type=int, help="loop mode: only the first N training images")
    ap.add_argument("--warmup", type=int, default=20, help="loop mode: steps left out of the timing")
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.loop or args.loop_side:
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import train_loop

        if args.loop_side:
            args.variant, args.batch = args.variant[0], args.batch[0]
            train_loop.side_main(args)
            return
        args.variant, args.batch = args.variant[0], args.batch[0]
        results = train_loop.compare(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "loop": results}, f, indent=1)
        return

    if args.upstream:
        # Importing upstream's model code sets this process-wide (rfdetr/detr.py, 1.11.2). Set it first, so every
        # side compiles and runs under one state (else our compiled graphs, built before upstream's import,
        # recompile in the first timed block on their TF32 guard).
        torch.set_float32_matmul_precision("high")
    if args.memory_budget is not None:
        # The min-cut partitioner's knob (torch >= 2.4): keep at most this share of the activations it would
        # save for the backward of a compiled graph, recomputing the cheapest (by estimated flops) instead.
        torch._functorch.config.activation_memory_budget = args.memory_budget
    if args.emulate_casts:
        torch._inductor.config.emulate_precision_casts = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{name}, torch {torch.__version__}, {args.classes} classes, modes {','.join(args.modes)}, "
        f"activation memory budget {torch._functorch.config.activation_memory_budget}, "
        f"emulate precision casts {args.emulate_casts}",
        flush=True,
    )
    rows = []
    for variant in args.variant:
        for batch in args.batch:
            rows.append(measure(variant, batch, args, device))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    if args.data:
        _loader_pass(args, device)


if __name__ == "__main__":
    main()
