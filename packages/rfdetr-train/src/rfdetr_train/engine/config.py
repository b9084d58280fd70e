"""Training section of the rfdetr-train configuration.

Fields left at ``None`` are filled by the recipe (:mod:`rfdetr_train.engine.recipes`): the fine-tuning recipe
of upstream RF-DETR for the published variants, a from-scratch recipe for ``seg-tiny``. The resolved values are
what ``config.yaml`` of a run records.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rfdetr_train.config_base import ConfigSection


class TrainConfig(ConfigSection):
    """Model, optimisation, engine and run-directory settings."""

    # -- model ----------------------------------------------------------------------------------------
    model: str | None = None  # variant; None = the weights file's, else seg-tiny
    weights: str | None = None  # official name or file; None = from scratch
    resolution: str | int | None = None  # N or "HxW"; None = the variant's default
    num_queries: int | None = Field(default=None, ge=1)
    drop_path: float | None = Field(default=None, ge=0.0, lt=1.0)

    # -- length ---------------------------------------------------------------------------------------
    epochs: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)  # optimiser steps; exclusive with epochs

    # -- optimisation ---------------------------------------------------------------------------------
    recipe: Literal["auto", "finetune", "scratch"] = "auto"
    batch_size: int | None = Field(default=None, ge=1)  # micro-batch per process
    grad_accum: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0.0)
    lr_encoder: float | None = Field(default=None, gt=0.0)
    lr_vit_layer_decay: float | None = Field(default=None, gt=0.0, le=1.0)
    lr_component_decay: float | None = Field(default=None, gt=0.0, le=1.0)
    weight_decay: float | None = Field(default=None, ge=0.0)
    lr_scheduler: Literal["step", "cosine"] | None = None
    warmup_steps: int | None = Field(default=None, ge=0)
    lr_drop_steps: int | None = Field(default=None, ge=1)  # "step" schedule: lr x0.1 from this step on
    min_lr_factor: float | None = Field(default=None, ge=0.0, le=1.0)  # "cosine" floor
    clip_grad_norm: float | None = Field(default=None, ge=0.0)  # 0 = off
    ema: bool | None = None
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)
    ema_tau: float | None = Field(default=None, ge=0.0)  # warm-up of the EMA decay, in updates
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 42
    device: str | None = None  # cpu, cuda, cuda:1; None = what Accelerate picks
    compile: bool = False  # torch.compile the training forward (recompiles per input shape are logged)
    # torch.compile mode: "reduce-overhead" / "max-autotune" replay the compiled forward and backward as CUDA
    # graphs (one per input shape, CUDA only); "default" does not
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    # share of the activations the compiled graph keeps for the backward (torch's
    # activation_memory_budget; None = torch's default, 1.0): lower recomputes the cheapest in the backward
    activation_memory_budget: float | None = Field(default=None, gt=0.0, le=1.0)
    # torch.compile the criterion's batched loss pass (dynamic shapes: one graph for every pair count); CUDA,
    # independent of `compile`; experimental: Triton crashed on a small float32 case on an H100 (docs/training.md)
    compile_criterion: bool = False
    grad_checkpointing: bool = False  # recompute backbone blocks in backward: less memory, ~1 more forward

    # -- validation and early stopping ----------------------------------------------------------------
    steps_per_validation: int | None = Field(default=None, ge=1)  # None = once per epoch
    test_limit: int | None = Field(default=None, ge=1)  # validate on the first N validation images
    val_batch_size: int | None = Field(default=None, ge=1)  # None = 2 x batch_size
    patience: int | None = Field(default=None, ge=1)  # validations without improvement; None = off
    min_delta: float = Field(default=0.0, ge=0.0)
    metric: str = "segm/AP"  # "<bbox|segm>/<key>" from the nested metrics; higher is better

    # -- robustness -----------------------------------------------------------------------------------
    max_nonfinite_steps: int = Field(default=20, ge=1)  # consecutive skipped steps before stopping

    # -- run directory and logging --------------------------------------------------------------------
    output: str = "runs"
    name: str | None = None
    resume: str | None = None  # "" = newest run; a run dir or checkpoints/last/
    wandb: bool = False
    log_every: int = Field(default=10, ge=1)  # steps between train_log.csv rows
    progress: bool = True

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution_text(cls, value):
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return f"{int(value[0])}x{int(value[1])}"
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str):
        kind, sep, key = value.partition("/")
        ok_key = key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARs", "ARm", "ARl") or (
            key.startswith("AR") and key[2:].isdigit()
        )
        if not sep or kind not in ("bbox", "segm", "boundary") or not ok_key:
            raise ValueError(
                f"metric {value!r} is not understood; give <bbox|segm|boundary>/<AP|AP50|AP75|APs|APm|APl|"
                "AR100|ARs|ARm|ARl>, e.g. segm/AP50"
            )
        return value

    @model_validator(mode="after")
    def _length_exclusive(self):
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give either `epochs` or `steps`, not both")
        return self

    @model_validator(mode="after")
    def _compile_options_need_compile(self):
        if not self.compile and (self.compile_mode != "default" or self.activation_memory_budget is not None):
            raise ValueError(
                "`compile_mode` and `activation_memory_budget` apply to the compiled forward: set `compile` "
                "too (--compile)"
            )
        return self

    def parsed_resolution(self) -> tuple[int, int] | None:
        """``resolution`` as ``(height, width)``, or ``None`` for the variant default."""
        return parse_resolution(self.resolution)


def parse_resolution(value: str | int | None) -> tuple[int, int] | None:
    """``640`` / ``"640"`` / ``"480x640"`` (height x width) -> ``(h, w)``; an error naming the forms otherwise."""
    from rfdetr_core.errors import InvalidResolutionError

    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    text = str(value).strip().lower().replace("*", "x")
    try:
        if "x" in text:
            h, w = (int(part) for part in text.split("x"))
            return h, w
        return int(text), int(text)
    except ValueError:
        raise InvalidResolutionError(
            f"resolution {value!r} is not understood; give one number (e.g. 432) or HxW (e.g. 384x672)."
        ) from None
