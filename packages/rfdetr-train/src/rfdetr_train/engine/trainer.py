"""The training loop: one code path for CPU, one GPU and many GPUs / nodes (``accelerate launch``).

Per optimiser step: ``grad_accum`` micro-batches under ``accelerator.accumulate`` (DDP syncs gradients on
the last one only), gradient clipping, one host sync that checks the loss and gradient norm are finite and
whether any process was asked to stop (SIGINT/SIGTERM), then the optimiser step and the EMA update, or a
skipped step counted by the :class:`~rfdetr_train.engine.guard.NonFiniteGuard`. The learning rate is a pure
function of the step counter. Validation runs every ``steps_per_validation`` steps (default: once per epoch)
on the EMA weights; a resumable checkpoint is written after every validation, at the end, and on a signal.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rfdetr_core.checkpoint import save_model
from rfdetr_core.cuda_graphs import graph_pools
from rfdetr_train.engine.early_stop import EarlyStopping
from rfdetr_train.engine.ema import ModelEMA
from rfdetr_train.engine.guard import NonFiniteGuard
from rfdetr_train.engine.optim import OptimSettings, build_optimizer, param_groups
from rfdetr_train.engine.progress import ProgressBar, StepTimer
from rfdetr_train.engine.schedule import LRSchedule
from rfdetr_train.engine.signals import GracefulStop
from rfdetr_train.engine.state import TrainingState, capture_rng, write_state_folder
from rfdetr_train.engine.trackers import Trackers
from rfdetr_train.engine.validation import (
    evaluate,
    image_loader_for,
    metric_value,
    summary_line,
    write_reports,
)
from rfdetr_train.losses.coefficients import LOSS_NAMES

if TYPE_CHECKING:
    from rfdetr_train.config import RunConfig
    from rfdetr_train.engine.setup import Parts

log = logging.getLogger("rfdetr_train")


@dataclass
class TrainResult:
    """What :func:`rfdetr_train.train` returns."""

    run_dir: Path
    step: int
    total_steps: int
    stopped: str  # "completed", "early-stopping", "signal:SIGTERM", ...
    best_metric: float | None = None
    best_step: int | None = None
    last_metrics: dict = field(default_factory=dict)
    skipped_steps: int = 0
    history: list = field(default_factory=list)  # [(step, seconds since start, metrics)] per validation

    @property
    def best_weights(self) -> Path:
        return self.run_dir / "best.safetensors"

    @property
    def last_weights(self) -> Path:
        return self.run_dir / "last.safetensors"


def _batches(loader):
    """Endless micro-batches, epoch after epoch, from the loader's (resumable) position.

    Creating a DataLoader iterator draws a seed from the global torch generator; that draw is kept out of
    the training stream (which the criterion's point sampling uses), so a run resumed mid-epoch draws the
    same random numbers as one that never stopped.
    """
    while True:
        it = iter(loader)
        with torch.random.fork_rng(devices=[]):
            first = next(it, None)
        if first is None:
            raise RuntimeError("The training loader produced an empty epoch.")
        yield first
        yield from it


class Trainer:
    """Owns the model, optimiser, EMA and loaders of one run; :meth:`fit` trains it.

    Args:
        run: the resolved :class:`~rfdetr_train.config.RunConfig` (recipe applied).
        run_dir: the run directory (exists).
        parts: the run's :class:`~rfdetr_train.engine.setup.Parts` (accelerator, model, card, data, loaders,
            criterion, evaluator).
        resume: a loaded ``checkpoints/last/`` to continue from.
    """

    def __init__(self, run: RunConfig, run_dir: Path, parts: Parts, resume: TrainingState | None = None):
        self.run, self.cfg, self.run_dir = run, run.train, Path(run_dir)
        self.acc = parts.accelerator
        self.variant, self.card, self.data = parts.variant, parts.card, parts.data
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.criterion = parts.criterion.to(self.acc.device).train()
        self.evaluator = parts.evaluator
        cfg = self.cfg
        if cfg.compile_criterion and self.acc.device.type != "cuda":
            # the criterion batches its layers (the pass that compiles) on CUDA only; elsewhere it keeps the
            # per-layer pass and its float order (the seeded CPU demo)
            log.warning("--compile-criterion has no effect on %s: it compiles the CUDA loss pass", self.acc.device)
        model = parts.model.to(self.acc.device).train()
        settings = OptimSettings(
            lr=cfg.lr,
            lr_encoder=cfg.lr_encoder,
            layer_decay=cfg.lr_vit_layer_decay,
            component_decay=cfg.lr_component_decay,
            weight_decay=cfg.weight_decay,
        )
        groups = param_groups(model, settings, num_layers=max(self.variant.out_feature_indexes) + 1)
        optimizer = build_optimizer(groups, self.acc.device)
        if resume is not None:
            model.load_state_dict(resume.model_state())
            optimizer.load_state_dict(resume.optimizer_state())
        self.ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema else None
        if self.ema is not None and resume is not None:
            ema_state = resume.ema_state()
            if ema_state is not None:
                self.ema.load_state_dict(ema_state, resume.state.get("ema_updates", 0))
            else:
                self.ema.set(model)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        # The compiled wrapper runs the training forward only; EMA, saving and validation use the module.
        self.forward = self._compiled(cfg) if cfg.compile else self.model
        # CUDA-graph replays reuse their output memory: each training forward starts a new step
        self._mark_graph_step = cfg.compile and cfg.compile_mode != "default" and self.acc.device.type == "cuda"
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / cfg.grad_accum))
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.val_every = cfg.steps_per_validation or self.steps_per_epoch
        self.schedule = LRSchedule(
            cfg.lr_scheduler,
            self.total_steps,
            warmup_steps=cfg.warmup_steps,
            lr_drop_steps=cfg.lr_drop_steps,
            min_factor=cfg.min_lr_factor,
        )
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps)
        self.early = EarlyStopping(cfg.patience, cfg.min_delta)
        self.step = 0
        self.history: list = []
        self.wandb_id = None
        self._resume = resume
        if resume is not None:
            st = resume.state
            self.step = int(st["step"])
            self.guard.load_state_dict(st.get("guard", {}))
            self.early.load_state_dict(st.get("early_stopping", {}))
            self.history = list(st.get("history", []))
            self.wandb_id = st.get("wandb_id")
            self.train_loader.load_state_dict(st["sampler"])
        self.main = self.acc.is_main_process
        self._shown = (float("nan"), 0.0, {"images_per_s": 0.0, "data_frac": 0.0})  # progress-bar postfix

    # -- helpers -----------------------------------------------------------------------------------------
    def _compiled(self, cfg):
        """``torch.compile`` of the prepared model in ``cfg.compile_mode``, under ``cfg.activation_memory_budget``.

        The budget is torch's process-wide min-cut partitioner setting (``torch._functorch.config``), read when
        a graph compiles, so it is set here and applies to every recompile of this run.
        """
        if cfg.activation_memory_budget is not None:
            import torch._functorch.config

            torch._functorch.config.activation_memory_budget = cfg.activation_memory_budget
        return torch.compile(self.model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.raw_model

    def _save_weights(self, path: Path, **extra) -> None:
        """``last``/``best.safetensors``: the evaluated weights, the run's card and the training record."""
        record = {
            "step": self.step,
            "epoch": self.train_loader.epoch,
            "weights": "ema" if self.ema is not None else "model",
            **extra,
        }
        save_model(path, self.eval_model.state_dict(), self.card, record=record)

    def save_state(self, reason: str) -> None:
        """Write ``checkpoints/last/`` and ``last.safetensors`` (collective: every process must call it)."""
        rng = capture_rng()
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object([rng])
        else:
            rngs = [rng]
        if self.main:
            raw = self.raw_model.state_dict()
            state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "epoch": self.train_loader.epoch,
                "sampler": self.train_loader.state_dict(),
                "ema_updates": self.ema.updates if self.ema is not None else 0,
                "guard": self.guard.state_dict(),
                "early_stopping": self.early.state_dict(),
                "history": self.history,
                "num_processes": self.acc.num_processes,
                "wandb_id": self.wandb_id,
                "reason": reason,
            }
            write_state_folder(
                self.run_dir / "checkpoints" / "last",
                model_state=raw,
                optimizer=self.optimizer.optimizer
                if hasattr(self.optimizer, "optimizer")
                else self.optimizer,
                ema_state=self.ema.state_dict() if self.ema is not None else None,
                rng_per_rank=rngs,
                state=state,
            )
            self._save_weights(self.run_dir / "last.safetensors")
        self.acc.wait_for_everyone()

    def _restore_rng(self) -> None:
        if self._resume is not None and not self._resume.restore_rng(self.acc.process_index):
            log.warning(
                "Resuming with more processes than the checkpoint had: new processes start fresh RNGs."
            )

    # -- validation --------------------------------------------------------------------------------------
    def validate(self, final: bool, bar: ProgressBar, started: float) -> bool:
        """Validate the EMA (or raw) weights; returns True when early stopping says stop."""
        if self.val_loader is None:
            return False
        t0 = time.perf_counter()
        report = evaluate(self.eval_model, self.val_loader, self.evaluator, self.acc)
        metrics = report.metrics
        value = metric_value(metrics, self.cfg.metric)
        is_best = self.early.update(value, self.step)
        elapsed = time.perf_counter() - started
        self.history.append([self.step, round(elapsed, 2), metrics])
        if self.main:
            bar.write(
                f"validation at step {self.step} ({time.perf_counter() - t0:.1f} s): {summary_line(metrics)}"
            )
            last = final or self.early.should_stop
            if self.run.eval.per_class == "every" or (self.run.eval.per_class == "last" and last):
                bar.write(report.per_class_text())
            extra = {"step": self.step, "epoch": self.train_loader.epoch, "time_s": round(elapsed, 2)}
            write_reports(
                self.run_dir,
                report,
                extra,
                self.run.eval,
                self.cfg.metric,
                final,
                load_image=image_loader_for(self.data, "val"),
            )
            if is_best:
                self._save_weights(self.run_dir / "best.safetensors", metrics=metrics)
            self.trackers.log({f"val/{k}": v for k, v in _flat(metrics).items()}, self.step, csv=False)
        self.acc.wait_for_everyone()
        return self.early.should_stop

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        self.trackers = Trackers.open(
            self.run_dir,
            main=self.main,
            use_wandb=cfg.wandb,
            config=self.run.model_dump(),
            resume_step=self.step if self._resume is not None else None,
            wandb_id=self.wandb_id,
        )
        self.wandb_id = self.trackers.wandb_id or self.wandb_id
        stream = _batches(self.train_loader)
        self._restore_rng()
        bar = ProgressBar(self.total_steps, self.step, enabled=self.main and cfg.progress)
        timer = StepTimer()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.clip_grad_norm if cfg.clip_grad_norm else math.inf
        fp16 = acc.mixed_precision == "fp16"
        device = acc.device
        stopped = "completed"
        started = time.perf_counter() - (self.history[-1][1] if self.history else 0.0)
        last_validated = self.step if self._resume is not None else -1
        try:
            with GracefulStop() as stop:
                while self.step < self.total_steps:
                    lr_factor = self.schedule.apply(self.optimizer, self.step)
                    loss_sum = torch.zeros((), device=device)
                    parts: dict[str, torch.Tensor] = {}
                    for _ in range(cfg.grad_accum):
                        batch = next(stream)
                        timer.data_ready()
                        batch = batch.to(device, non_blocking=True)
                        with acc.accumulate(self.model):
                            if self._mark_graph_step:
                                torch.compiler.cudagraph_mark_step_begin()
                            outputs = self.forward(batch.images)
                            losses = self.criterion(outputs, batch.targets)
                            loss = self.criterion.total_loss(losses)
                            acc.backward(loss)
                        loss_sum += loss.detach()
                        for k in LOSS_NAMES:
                            if k in losses:
                                parts[k] = parts.get(k, 0) + losses[k].detach()
                        timer.compute_done(len(batch) * acc.num_processes)
                    grad_norm = acc.clip_grad_norm_(params, clip)
                    if grad_norm is None:
                        grad_norm = torch.zeros((), device=device)
                    # one host sync per step: [loss or grads not finite, stop requested] over all processes
                    bad = ~torch.isfinite(loss_sum) | (~torch.isfinite(grad_norm) & (not fp16))
                    flags = torch.stack([bad.float(), torch.tensor(float(stop.requested), device=device)])
                    if acc.num_processes > 1:
                        flags = acc.gather(flags).view(-1, 2).amax(dim=0)
                    bad_any, stop_any = (bool(v) for v in flags.tolist())
                    if self.guard.record(not bad_any, self.step + 1):
                        self.optimizer.step()
                        skipped_by_scaler = fp16 and getattr(self.optimizer, "step_was_skipped", False)
                        if self.ema is not None and not skipped_by_scaler:
                            self.ema.update(self.raw_model)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    timer.compute_done(0)
                    if self.main and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                        self._log_step(bar, loss_sum, parts, lr_factor, grad_norm, timer, bad_any)
                    bar.update(1, *self._shown)
                    if stop_any:
                        stopped = f"signal:{stop.signal_name or 'remote'}"
                        break
                    if self.step % self.val_every == 0 or self.step == self.total_steps:
                        final = self.step == self.total_steps
                        should_stop = self.validate(final, bar, started)
                        last_validated = self.step
                        self.save_state("validation")
                        timer.restart()
                        if should_stop:
                            stopped = "early-stopping"
                            if self.main:
                                bar.write(
                                    f"early stopping at step {self.step}: no improvement of {cfg.metric} by more "
                                    f"than {cfg.min_delta} in {cfg.patience} validations (best "
                                    f"{self.early.best:.4f} at step {self.early.best_step})"
                                )
                            break
        finally:
            bar.close()
        if stopped.startswith("signal"):
            self.save_state("signal")
            if self.main:
                print(
                    f"stopped by {stopped.split(':', 1)[1]} at step {self.step}; resumable checkpoint in "
                    f"{self.run_dir / 'checkpoints' / 'last'} (continue with --resume {self.run_dir})",
                    flush=True,
                )
        elif last_validated != self.step:
            if stopped == "completed" and self.val_loader is not None:
                self.validate(True, ProgressBar(0, 0, False), started)
            self.save_state(stopped)
        if self.main and cfg.compile:
            from torch._dynamo.utils import counters

            log.info("torch.compile: %d graph(s) compiled in this run", counters["stats"]["unique_graphs"])
        if self.main and self.val_loader is None:
            self._save_weights(self.run_dir / "best.safetensors")
        self.trackers.close()
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            total_steps=self.total_steps,
            stopped=stopped,
            best_metric=self.early.best,
            best_step=self.early.best_step,
            last_metrics=self.history[-1][2] if self.history else {},
            skipped_steps=self.guard.skipped,
            history=self.history,
        )

    def _log_step(self, bar, loss_sum, parts, lr_factor, grad_norm, timer, bad) -> None:
        cfg = self.cfg
        n = cfg.grad_accum
        loss = float(loss_sum) / n
        lr = cfg.lr * lr_factor
        timing = timer.pop()
        row = {
            "epoch": self.train_loader.epoch,
            "loss": loss,
            **{k: float(v) / n for k, v in parts.items()},
            "lr": lr,
            "grad_norm": float(grad_norm),
            "images_per_s": timing["images_per_s"],
            "data_s": timing["data_s"],
            "compute_s": timing["compute_s"],
            "skipped_steps": self.guard.skipped,
        }
        memory = ""
        if self.acc.device.type == "cuda":
            # peak since the start of the run, this process's card (training steps and validations)
            peak = torch.cuda.max_memory_allocated(self.acc.device)
            if self._mark_graph_step:  # CUDA-graph replays use their pools unseen by the allocator's count
                peak += sum(reserved - allocated for reserved, allocated in graph_pools(self.acc.device).values())
            row["peak_mem_gib"] = peak / 2**30
            memory = f"  peak {row['peak_mem_gib']:.2f} GiB"
        self.trackers.log(row, self.step)
        skipped = " (skipped: non-finite)" if bad else ""
        bar.write(
            f"step {self.step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3g}  "
            f"{timing['images_per_s']:.1f} img/s  data {100 * timing['data_frac']:.0f}%{memory}{skipped}"
        )
        self._shown = (loss, lr, timing)


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{kind}/{k}": v for kind, sec in metrics.items() for k, v in sec.items()}
