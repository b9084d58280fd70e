"""SIGINT / SIGTERM during training: finish the current optimiser step, save a resumable checkpoint, stop.

The first signal only sets a flag that the loop reads between steps, so the checkpoint is taken at a step
boundary (model, optimiser, EMA, RNG and sampler all agree). A second SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into a ``requested`` flag (main thread only)."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
