"""Batches, collation and the training / validation loaders (with data-wait timing).

:class:`Batch` carries ``images [B, 3, H, W]`` (normalised) and one target dict per image (see
:class:`~rfdetr_train.data.dataset.InstanceDataset`). :class:`TrainLoader` wraps a ``DataLoader`` driven by the
:class:`~rfdetr_train.data.sampler.ResumableBatchSampler`, advances the sampler as batches are *consumed*
(so its ``state_dict`` is exact despite prefetching) and measures how long the consumer waited for data
apart from the time it spent between batches (compute).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from rfdetr_train.data.dataset import InstanceDataset, SampleKey
from rfdetr_train.data.sampler import ResumableBatchSampler
from rfdetr_train.data.shared_memory import shared_empty


@dataclass
class Batch:
    """One collated batch: ``images [B, 3, H, W]`` float32 normalised, ``targets`` (one dict per image:
    ``labels [N]`` int64, ``boxes [N, 4]`` normalised cxcywh, ``masks [N, H, W]`` bool, ``image_id`` int,
    ``orig_size`` / ``size`` int64 [2] as (h, w)), and ``dropped`` (instances lost to augmentation)."""

    images: torch.Tensor
    targets: list[dict]
    dropped: int = 0

    def to(self, device, non_blocking: bool = False) -> Batch:
        def move(t):
            return {
                k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in t.items()
            }

        return Batch(
            self.images.to(device, non_blocking=non_blocking), [move(t) for t in self.targets], self.dropped
        )

    def pin_memory(self) -> Batch:
        return Batch(
            self.images.pin_memory(),
            [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in t.items()} for t in self.targets],
            self.dropped,
        )

    def __len__(self) -> int:
        return len(self.targets)


def collate(samples: list[dict]) -> Batch:
    """Samples of one size -> :class:`Batch` (the batch sampler gives every sample of a batch one size)."""
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"Samples of one batch must share one size, got {sorted(sizes)}.")
    images = shared_empty((len(samples), *next(iter(sizes))), samples[0]["image"].dtype)  # [B, 3, H, W]
    torch.stack([s["image"] for s in samples], out=images)
    return Batch(images, [s["target"] for s in samples], sum(s["dropped"] for s in samples))


@dataclass
class LoaderTiming:
    """Seconds the consumer waited for batches (``data_wait``) and spent between them (``compute``)."""

    data_wait: float = 0.0
    compute: float = 0.0
    batches: int = 0
    last_wait: float = 0.0
    dropped_instances: int = 0
    history: list = field(default_factory=list, repr=False)

    @property
    def data_fraction(self) -> float:
        total = self.data_wait + self.compute
        return self.data_wait / total if total else 0.0

    def reset(self) -> None:
        self.data_wait = self.compute = self.last_wait = 0.0
        self.batches = self.dropped_instances = 0


def timed(iterable, timing: LoaderTiming) -> Iterator:
    """Iterate ``iterable``, adding each wait for the next item to ``timing.data_wait`` and the time the
    consumer kept each item (until it asked for the next one) to ``timing.compute``."""
    it = iter(iterable)
    handed_out = None
    while True:
        t0 = time.perf_counter()
        if handed_out is not None:
            timing.compute += t0 - handed_out
        try:
            item = next(it)
        except StopIteration:
            return
        t1 = time.perf_counter()
        timing.last_wait = t1 - t0
        timing.data_wait += timing.last_wait
        timing.batches += 1
        if isinstance(item, Batch):
            timing.dropped_instances += item.dropped
        handed_out = time.perf_counter()
        yield item


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """Loader workers ignore SIGINT / SIGTERM: Ctrl-C and ``timeout`` signal the whole process group, and the
    main process must stay able to finish its step and save a checkpoint. Workers still end with the loader
    (shutdown event) or when the main process dies (PyTorch's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loader_kwargs(workers: int, pin_memory: bool) -> dict:
    kw: dict = {"num_workers": workers, "collate_fn": collate, "pin_memory": pin_memory}
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=2, worker_init_fn=ignore_stop_signals)
    return kw


class TrainLoader:
    """Iterates the training batches, one epoch per ``iter()``, resumably.

    ``len(loader)`` is the batches per epoch; ``loader.sampler.global_step`` the batches consumed so far;
    ``state_dict()`` / ``load_state_dict()`` save and restore the position (with the seed), so a resumed
    run sees the same batches. ``loader.timing`` holds data-wait vs compute seconds.
    """

    def __init__(
        self,
        dataset: InstanceDataset,
        sampler: ResumableBatchSampler,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.sampler = sampler
        self.timing = LoaderTiming()
        self.workers = int(workers)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, **_loader_kwargs(self.workers, pin_memory)
        )

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> Iterator[Batch]:
        for batch in timed(self._loader, self.timing):
            self.sampler.advance()
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class _ValBatches(torch.utils.data.Sampler):
    def __init__(self, n: int, batch_size: int, size: tuple[int, int], rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.size = n, batch_size, size
        self.indices = list(range(rank, n, world_size))  # strided shards: every image exactly once

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for s in range(0, len(self.indices), self.batch_size):
            yield [SampleKey(i, 0, self.size) for i in self.indices[s : s + self.batch_size]]


class ValLoader:
    """Validation batches in dataset order at the model resolution (``limit``: only the first N images).

    Targets keep ``orig_size`` for evaluation at the source size; ``image_ids`` lists the images covered.
    """

    def __init__(self, dataset: InstanceDataset, batch_size: int, workers: int = 0, pin_memory: bool = False,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        self.dataset = dataset
        self.timing = LoaderTiming()
        self.batches = _ValBatches(len(dataset), batch_size, dataset.size, rank, world_size)
        kw = _loader_kwargs(int(workers), pin_memory)
        kw.pop("persistent_workers", None)
        self._loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.batches, **kw)

    @property
    def image_ids(self) -> list[int]:
        return [self.dataset.records[i].image_id for i in self.batches.indices]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        return timed(self._loader, self.timing)
