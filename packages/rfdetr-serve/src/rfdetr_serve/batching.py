"""Dynamic batching: concurrent requests share model calls.

One worker thread per model (per device) owns the model. It blocks for the first waiting item, then keeps
collecting until it holds ``max_batch`` items or ``max_wait_s`` has passed since that first item, and runs
them as one batch. This is Triton's dynamic batcher rule (``max_batch_size``, ``max_queue_delay_microseconds``;
export-serve-anchors.md section 7); with ``max_wait_s = 0`` a batch is whatever is already waiting, so an
idle server adds no delay and a busy one batches on its own.

Callers on the event loop ``await submit(item)``. The queue is bounded: past ``max_queue`` waiting items
``submit`` raises :class:`QueueFull` at once (the app answers 503 with ``Retry-After``) instead of growing
without bound. A batch that fails is re-run one item at a time, so one bad item fails only its own request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More items are waiting than ``max_queue`` allows."""


class BatcherStopped(Exception):
    """The batcher is shutting down and takes no new items."""


@dataclass
class BatchTiming:
    """Per item: seconds waited in the queue, seconds of the model call, and the batch's size."""

    queue_s: float
    inference_s: float
    batch_size: int


@dataclass
class _Pending:
    item: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Groups items submitted from an event loop into calls of ``run_batch(items) -> results`` (same order,
    one result per item) on one worker thread.

    Args:
        run_batch: the model call; runs only on the worker thread.
        max_batch: most items per call (``>= 1``).
        max_wait_s: longest time the first item of a batch waits for company.
        max_queue: most items waiting (not yet in a batch); more raise :class:`QueueFull`.
        on_batch: called on the worker thread after each call with ``(batch_size, seconds)`` (metrics).
        name: the thread's name.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "rfdetr-model",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self._on_batch = on_batch
        self._waiting: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    @property
    def queued(self) -> int:
        """Items waiting for a batch now."""
        return len(self._waiting)

    async def submit(self, item: Any) -> tuple[Any, BatchTiming]:
        """Queue ``item``; returns its result and timing once its batch has run.

        Raises :class:`QueueFull` at once when ``max_queue`` items are already waiting, and re-raises what
        ``run_batch`` raised for this item.
        """
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop, loop.create_future())
        with self._cond:
            if self._stopping:
                raise BatcherStopped("The server is shutting down.")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} images are already waiting (--max-queue {self.max_queue}).")
            self._waiting.append(pending)
            self._cond.notify()
        return await pending.future

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish every item already queued, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._started:
            self._thread.join(timeout)

    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._waiting:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._waiting[0].enqueued + self.max_wait_s
            while len(self._waiting) < self.max_batch and not self._stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch, len(self._waiting))
            return [self._waiting.popleft() for _ in range(n)]

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # requests whose client went away are not run (a read of the future's state; it only moves to
            # "cancelled" on the loop, and a late cancel is harmless: _resolve skips done futures)
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            outcomes = self._run_guarded([p.item for p in batch])
            seconds = time.perf_counter() - started
            if self._on_batch is not None:
                self._on_batch(len(batch), seconds)
            for pending, (ok, value) in zip(batch, outcomes):
                timing = BatchTiming(started - pending.enqueued, seconds, len(batch))
                result = (value, timing) if ok else value
                pending.loop.call_soon_threadsafe(_resolve, pending.future, ok, result)

    def _run_guarded(self, items: list[Any]) -> list[tuple[bool, Any]]:
        """``(True, result)`` or ``(False, exception)`` per item: a failed batch is retried item by item so
        the failure stays with the item that caused it."""
        try:
            results = list(self._run_batch(items))
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            return [(True, r) for r in results]
        except Exception as exc:
            if len(items) == 1:
                return [(False, exc)]
        outcomes = []
        for item in items:
            try:
                outcomes.append((True, self._run_batch([item])[0]))
            except Exception as exc:
                outcomes.append((False, exc))
        return outcomes


def _resolve(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():  # the request was cancelled (client went away)
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
