"""Step timing and the progress bar (main process only).

:class:`StepTimer` splits each optimiser step into time spent waiting for data and time spent computing,
so an input-bound run is visible at a glance (users ask for exactly this: data_time vs step_time).
"""

from __future__ import annotations

import sys
import time


class StepTimer:
    """Accumulates data-wait and compute seconds and images between :meth:`pop` calls."""

    def __init__(self):
        self.data_s = 0.0
        self.compute_s = 0.0
        self.images = 0
        self._mark = time.perf_counter()

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.data_s += now - self._mark
        self._mark = now

    def compute_done(self, images: int) -> None:
        now = time.perf_counter()
        self.compute_s += now - self._mark
        self._mark = now
        self.images += images

    def restart(self) -> None:
        """Forget time spent outside the loop (validation, saving)."""
        self._mark = time.perf_counter()

    def pop(self) -> dict[str, float]:
        total = self.data_s + self.compute_s
        out = {
            "images_per_s": self.images / total if total > 0 else 0.0,
            "data_s": self.data_s,
            "compute_s": self.compute_s,
            "data_frac": self.data_s / total if total > 0 else 0.0,
        }
        self.data_s = self.compute_s = 0.0
        self.images = 0
        return out


class ProgressBar:
    """A tqdm bar over optimiser steps showing loss, lr, images/s and data-wait share; no-op when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        # Only on a terminal: in logs and pipes the "step k" lines are the record, a bar would be noise.
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                leave=True,
            )

    def update(self, n: int, loss: float, lr: float, timing: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(
            f"loss {loss:.3f} lr {lr:.2e} {timing['images_per_s']:.1f} img/s "
            f"data {100 * timing['data_frac']:.0f}%",
            refresh=False,
        )
        self.bar.update(n)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
