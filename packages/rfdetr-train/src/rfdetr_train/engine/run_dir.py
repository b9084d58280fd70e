"""The run directory: where a training run writes everything, and how ``--resume`` finds it.

Layout (DESIGN "Runs")::

    <output, default ./runs>/<name, default train, train2, ...>/
        config.yaml              the resolved configuration
        checkpoints/last/        resumable state (safetensors + JSON), replaced atomically as a whole
        last.safetensors         latest weights, our format (EMA weights when EMA is on)
        best.safetensors         weights with the best validation metric
        train_log.csv, results.csv, metrics.json, per_class_*.csv, events.out.tfevents.* (TensorBoard)

``--resume`` alone takes the newest run's ``checkpoints/last/`` under ``--output``; ``--resume PATH`` takes a
run directory or a ``checkpoints/last/`` folder. Weight files belong to ``--weights`` (fresh optimiser).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rfdetr_core.errors import RFDETRError

LAST_DIR = Path("checkpoints") / "last"
STATE_FILE = "state.json"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


class ResumeError(RFDETRError):
    """``--resume`` points at something that is not a resumable run."""


def new_run_dir(output: str | os.PathLike, name: str | None) -> Path:
    """Create and return a fresh run directory.

    Without ``name``: ``train``, then ``train2``, ``train3``... (the first free one). With ``name``: that
    folder, which must not already hold a run (so nothing is overwritten by accident).
    """
    root = Path(output)
    if name:
        check_new_run_dir(output, name)
        run = root / name
        run.mkdir(parents=True, exist_ok=True)
        return run
    return next_free_dir(root, "train")


def check_new_run_dir(output: str | os.PathLike, name: str | None) -> None:
    """Raise if :func:`new_run_dir` would refuse ``name`` (a folder that already holds a run); creates nothing."""
    if not name:
        return
    run = Path(output) / name
    if run.exists() and any(run.iterdir()):
        raise RFDETRError(
            f"Run directory {run} already exists and is not empty. Pick another --name, or continue it "
            f"with --resume {run}."
        )


def next_free_dir(root: Path, prefix: str) -> Path:
    """Create and return ``root/prefix``, else ``prefix2``, ``prefix3``... (the first free name)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in root.iterdir()}
    index = 1
    while True:
        candidate = prefix if index == 1 else f"{prefix}{index}"
        if candidate not in taken:
            try:
                (root / candidate).mkdir()
            except FileExistsError:  # another process took it between the listing and mkdir
                taken.add(candidate)
                continue
            return root / candidate
        index += 1


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _last_dir_of(run: Path) -> Path | None:
    last = run / LAST_DIR
    if (last / STATE_FILE).is_file():
        return last
    # A crash between the two renames of a checkpoint swap leaves only the previous copy.
    old = run / "checkpoints" / ".last.old"
    if (old / STATE_FILE).is_file():
        return old
    return None


def resolve_resume(resume: str, output: str | os.PathLike) -> Path:
    """The ``checkpoints/last/`` folder that ``--resume [PATH]`` means; a clear error otherwise."""
    if resume in ("", None):
        root = Path(output)
        runs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        candidates = [(last, p) for p in runs if (last := _last_dir_of(p)) is not None]
        if not candidates:
            raise ResumeError(
                f"--resume found no run with a checkpoints/last/ folder under {root.resolve()}. Pass the run "
                "directory explicitly (--resume runs/train3) or set --output to the runs folder."
            )
        newest = max(candidates, key=lambda c: ((c[0] / STATE_FILE).stat().st_mtime, _natural_key(c[1])))
        return newest[0]
    path = Path(resume)
    if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
        raise ResumeError(
            f"{path} is a weights file. --resume continues a run from its checkpoints/last/ folder; to start "
            f"a new run from these weights use --weights {path}."
        )
    if not path.exists():
        raise ResumeError(f"--resume {path}: no such run directory.")
    if (path / STATE_FILE).is_file():
        return path
    last = _last_dir_of(path)
    if last is None:
        raise ResumeError(
            f"{path} holds no resumable checkpoint (expected {path / LAST_DIR / STATE_FILE}). Runs stopped "
            "before their first checkpoint cannot be resumed; start them again."
        )
    return last


def run_dir_of(last_dir: Path) -> Path:
    """The run directory owning a ``checkpoints/last/`` folder."""
    return last_dir.parent.parent
