"""Where training numbers go: ``train_log.csv`` always, TensorBoard when installed, W&B with ``--wandb``.

Only the main process logs. Each tracker takes flat ``{name: number}`` rows keyed by the optimiser step.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from rfdetr_core.errors import require

log = logging.getLogger("rfdetr_train")


class CSVTracker:
    """One row per logging step in ``path``; new columns rewrite the file with the wider header.

    On resume, rows past the resumed step (logged after the last checkpoint, then lost) are dropped.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.fields: list[str] = []
        self.rows: list[dict] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.fields = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
            self._rewrite()

    def _rewrite(self) -> None:
        from rfdetr_core.atomic_io import atomic_write_text

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def log(self, row: dict, step: int) -> None:
        row = {"step": step, **row}
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new or not self.path.is_file():
            self.fields += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore").writerow(row)

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        log.info("TensorBoard logs: %s (view with `tensorboard --logdir %s`)", folder, folder)

    def log(self, row: dict, step: int) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def check_trackers(use_wandb: bool) -> None:
    """Fail before a run starts (and before its directory exists) when an asked-for tracker is missing:
    ``--wandb`` without the ``wandb`` package raises the install hint of :func:`WandbTracker`."""
    if use_wandb:
        require("wandb", "wandb", "rfdetr-train")


class WandbTracker:
    def __init__(self, folder: Path, name: str, config: dict, resume_id: str | None = None):
        wandb = require("wandb", "wandb", "rfdetr-train")
        self.run = wandb.init(
            project="rfdetr-train", name=name, dir=str(folder), config=config, id=resume_id, resume="allow"
        )
        self.id = self.run.id

    def log(self, row: dict, step: int) -> None:
        self.run.log(dict(row), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """All active trackers behind one ``log`` call; inert on non-main processes."""

    def __init__(self, items: list):
        self.items = items

    @classmethod
    def open(
        cls,
        run_dir: Path,
        *,
        main: bool,
        use_wandb: bool,
        config: dict,
        resume_step: int | None = None,
        wandb_id: str | None = None,
    ) -> Trackers:
        if not main:
            return cls([])
        items: list = [CSVTracker(run_dir / "train_log.csv", resume_step)]
        try:
            import tensorboard  # noqa: F401  (a dependency of rfdetr-train; absent only in trimmed installs)
        except ImportError:
            log.info("TensorBoard is not installed; logging to train_log.csv only.")
        else:
            items.append(TensorBoardTracker(run_dir))
        if use_wandb:
            items.append(WandbTracker(run_dir, run_dir.name, config, wandb_id))
        return cls(items)

    @property
    def wandb_id(self) -> str | None:
        return next((t.id for t in self.items if isinstance(t, WandbTracker)), None)

    def log(self, row: dict, step: int, csv: bool = True) -> None:
        """Log ``row`` everywhere; ``csv=False`` keeps it out of ``train_log.csv`` (validation metrics, which
        ``results.csv`` holds)."""
        for t in self.items:
            if csv or not isinstance(t, CSVTracker):
                t.log(row, step)

    def close(self) -> None:
        for t in self.items:
            t.close()
