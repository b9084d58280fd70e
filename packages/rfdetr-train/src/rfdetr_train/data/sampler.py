"""A seedable, resumable batch sampler that owns multi-scale training.

Batch ``b`` of epoch ``e`` holds positions ``[b*B*W + r*B, ... + B)`` of the epoch's permutation
(``numpy.random.default_rng((seed, e))``) for rank ``r`` of ``W`` replicas, and is built at the size
chosen by ``random.Random(seed, global step)`` from the multi-scale set, where the global step counts
batches since the start of training. Nothing depends on workers or wall-clock, so a run resumed from
:meth:`ResumableBatchSampler.state_dict` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from rfdetr_train.data.dataset import SampleKey


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields lists of :class:`~rfdetr_train.data.dataset.SampleKey` (one list per batch).

    Args:
        num_samples: dataset length.
        batch_size: samples per batch on this rank.
        sizes: output sizes (H, W) to choose from per step; one entry disables multi-scale.
        seed: seeds the permutation of every epoch and the size of every step.
        shuffle: permute each epoch (else dataset order).
        drop_last: drop the incomplete last batch of an epoch; without it, the last batch is short.
        min_batches: tiny datasets are repeated within an epoch until it has at least this many batches.
        rank, world_size: this process's shard (each rank gets a disjoint slice of every global batch).

    The position (``epoch``, ``batch``) is advanced by the consumer (:class:`~rfdetr_train.data.loaders.
    TrainLoader`) as batches are used, not as they are prefetched, so :meth:`state_dict` is exact.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        sizes: Sequence[tuple[int, int]],
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        min_batches: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_samples <= 0:
            raise ValueError("The training split has no images.")
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"Bad sampler arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        if not sizes:
            raise ValueError("At least one training size is needed.")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        global_batch = self.batch_size * self.world_size
        # repeat tiny datasets so an epoch has at least min_batches full global batches
        self.repeats = max(1, -(-int(min_batches) * global_batch // self.num_samples))
        n = self.num_samples * self.repeats
        self.batches_per_epoch = n // global_batch if drop_last else -(-n // global_batch)
        if self.batches_per_epoch == 0:
            self.repeats = -(-global_batch // self.num_samples)
            self.batches_per_epoch = 1
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already consumed

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def global_step(self) -> int:
        """Batches consumed since the start of training."""
        return self.epoch * self.batches_per_epoch + self.batch

    def size_for_step(self, step: int) -> tuple[int, int]:
        """The output size of global step ``step`` (same on every rank)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return self.sizes[random.Random(self.seed * 1_000_003 + step).randrange(len(self.sizes))]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices of one epoch, in order (repeated for tiny datasets)."""
        parts = []
        for r in range(self.repeats):
            if self.shuffle:
                parts.append(np.random.default_rng((self.seed, int(epoch), r)).permutation(self.num_samples))
            else:
                parts.append(np.arange(self.num_samples))
        return np.concatenate(parts)

    def batch_keys(self, epoch: int, batch: int) -> list[SampleKey]:
        """The keys of batch ``batch`` of ``epoch`` on this rank."""
        order = self.epoch_order(epoch)
        gb = self.batch_size * self.world_size
        start = batch * gb + self.rank * self.batch_size
        idx = order[start : start + self.batch_size]
        if len(idx) < self.batch_size and not self.drop_last and self.world_size > 1:
            idx = np.concatenate([idx, order[: self.batch_size - len(idx)]])  # equal work on every rank
        size = self.size_for_step(epoch * self.batches_per_epoch + batch)
        # the repeat number goes into the epoch so a repeated image gets fresh augmentation
        return [
            SampleKey(int(i), epoch * self.repeats + (start + k) // self.num_samples, size)
            for k, i in enumerate(idx)
        ]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        """The remaining batches of the current epoch (from the consumed position)."""
        epoch, start = self.epoch, self.batch
        for b in range(start, self.batches_per_epoch):
            yield self.batch_keys(epoch, b)

    def advance(self) -> None:
        """Mark one batch as consumed (rolls over to the next epoch at the end)."""
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; a different dataset length or batch layout is an error."""
        for k in ("num_samples", "batch_size", "world_size", "seed"):
            if k in state and int(state[k]) != getattr(self, k):
                raise ValueError(
                    f"Cannot resume the data order: {k} was {state[k]}, now {getattr(self, k)}. "
                    "Resume with the same dataset, batch size, number of processes and seed."
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
