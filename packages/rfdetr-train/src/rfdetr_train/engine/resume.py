"""``--resume``: the saved configuration a run continues with, what the command line cannot change (and why),
and the answer for a run that has nothing left to train."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rfdetr_train.config import RunConfig
from rfdetr_train.engine.options import load_saved
from rfdetr_train.engine.run_dir import ResumeError, resolve_resume, run_dir_of
from rfdetr_train.engine.state import TrainingState

log = logging.getLogger("rfdetr_train")

# Options that --resume takes from the command line: where to look for the run, and the flag itself.
_OWN = ("resume", "output")
_FINISHED = ("completed", "early-stopping")


def resumed_run(run: RunConfig, options: dict[str, Any]) -> tuple[RunConfig, Path, TrainingState]:
    """The saved configuration, run directory and state that ``--resume`` continues.

    Raises:
        ResumeError: no resumable run, or one that has already finished (the message says how to train on).
    """
    last = resolve_resume(run.train.resume, run.train.output)
    run_dir = run_dir_of(last)
    state = TrainingState(last)
    step, total = int(state.state["step"]), state.state.get("total_steps")
    reason = state.state.get("reason")
    if reason in _FINISHED or (total is not None and step >= int(total)):
        how = "it stopped early (no improvement)" if reason == "early-stopping" else f"step {step} of {total}"
        raise ResumeError(
            f"{run_dir} has finished ({how}); there is nothing to resume. To train further, start a new run "
            f"from its weights: --weights {run_dir / 'last.safetensors'} (with --steps or --epochs for the "
            "length)."
        )
    saved = load_saved(run_dir / "config.yaml")
    ignored = {k: v for k, v in options.items() if v is not None and k not in _OWN}
    if ignored:
        given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(ignored.items()))
        log.warning(
            "--resume continues %s exactly where it stopped, with its saved configuration (%s): the length, "
            "schedule and data order are part of the saved state, so %s is ignored. To train with other "
            "settings, start a new run from its weights: --weights %s.",
            run_dir, _saved_values(saved, ignored), given, run_dir / "last.safetensors",
        )  # fmt: skip
    run = saved.model_copy(update={"train": saved.train.model_copy(update={"resume": str(last)})})
    return run, run_dir, state


def _saved_values(saved: RunConfig, ignored: dict[str, Any]) -> str:
    """``steps 3400, lr 0.00025``: the saved values of the ignored options (those a section holds)."""
    parts = []
    for key in sorted(ignored):
        for section in (saved.train, saved.data, saved.eval):
            if key in type(section).model_fields:
                parts.append(f"{key.replace('_', '-')} {getattr(section, key)}")
                break
    return ", ".join(parts) or "see its config.yaml"


def resume_position(state: TrainingState) -> str:
    """``step 400 of 3400``: where a resumed run continues."""
    return f"step {state.state['step']} of {state.state.get('total_steps', '?')}"


def resume_line(run_dir: Path, state: TrainingState) -> str:
    """``resuming runs/train at step 400 of 3400``."""
    return f"resuming {run_dir} at {resume_position(state)}"
