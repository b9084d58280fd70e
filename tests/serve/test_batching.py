"""The dynamic batcher on its own (a fake model): batches fill up to max_batch, wait at most max_wait, a full
queue refuses at once, a failing item fails only its own request, and stop() finishes what is queued."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rfdetr_serve.batching import Batcher, BatcherStopped, QueueFull


class FakeModel:
    def __init__(self, delay: float = 0.0, fail_on=None):
        self.calls: list[list] = []
        self.delay = delay
        self.fail_on = fail_on
        self.thread_names: set[str] = set()

    def __call__(self, items):
        self.calls.append(list(items))
        self.thread_names.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [x * 10 for x in items]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_calls_up_to_max_batch():
    model = FakeModel(delay=0.05)
    b = Batcher(model, max_batch=4, max_wait_s=0.2, max_queue=100)
    b.start()

    async def go():
        return await asyncio.gather(*(b.submit(i) for i in range(10)))

    out = run(go())
    b.stop()
    assert [r for r, _ in out] == [i * 10 for i in range(10)]
    assert max(len(c) for c in model.calls) == 4 and sum(len(c) for c in model.calls) == 10
    assert len(model.calls) == 3  # 4 + 4 + 2
    assert model.thread_names == {"rfdetr-model"}  # one model thread
    assert {t.batch_size for _, t in out} == {4, 2}


def test_lone_item_waits_at_most_max_wait():
    model = FakeModel()
    b = Batcher(model, max_batch=8, max_wait_s=0.3, max_queue=10)
    b.start()
    (result, timing) = run(b.submit(1))
    b.stop()
    assert result == 10 and timing.batch_size == 1
    assert timing.queue_s + 1e-3 >= 0.3  # waited for company, then ran alone


def test_full_queue_refuses_immediately():
    release = threading.Event()

    def slow(items):
        release.wait(10)
        return list(items)

    b = Batcher(slow, max_batch=1, max_wait_s=0.0, max_queue=2)
    b.start()

    async def go():
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.2)  # the worker holds item 0; the queue is empty again
        waiting = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="--max-queue 2"):
            await b.submit(3)
        release.set()
        return await asyncio.gather(first, *waiting)

    assert [r for r, _ in run(go())] == [0, 1, 2]
    b.stop()


def test_failing_item_fails_only_its_request():
    model = FakeModel(fail_on=3)
    b = Batcher(model, max_batch=8, max_wait_s=0.2, max_queue=100)
    b.start()

    async def go():
        return await asyncio.gather(*(b.submit(i) for i in range(6)), return_exceptions=True)

    out = run(go())
    b.stop()
    assert isinstance(out[3], ValueError) and "bad item 3" in str(out[3])
    assert [out[i][0] for i in (0, 1, 2, 4, 5)] == [0, 10, 20, 40, 50]
    assert len(model.calls[0]) == 6  # one shared call failed, then each item alone


def test_stop_finishes_queued_items_and_refuses_new_ones():
    model = FakeModel(delay=0.05)
    b = Batcher(model, max_batch=2, max_wait_s=0.0, max_queue=100)
    b.start()

    async def go():
        futures = [asyncio.ensure_future(b.submit(i)) for i in range(5)]
        await asyncio.sleep(0.01)
        stopper = asyncio.get_running_loop().run_in_executor(None, b.stop)
        results = await asyncio.gather(*futures)
        await stopper
        with pytest.raises(BatcherStopped):
            await b.submit(9)
        return results

    assert [r for r, _ in run(go())] == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_wait_s": -1.0}, {"max_queue": 0}])
def test_bad_settings(kwargs):
    args = {"max_batch": 2, "max_wait_s": 0.0, "max_queue": 2, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Batcher(FakeModel(), **args)
