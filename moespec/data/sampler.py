"""Deterministic, resumable, rank-sharded batches of a dataset (:func:`batch_iterator`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from moespec.data.packing import length_grouped_order


class StatefulBatchSampler(Sampler[list[int]]):
    """Per-rank index batches from a seeded per-epoch shuffle, resumable at (epoch, position).

    ``batch_size`` is per rank; global batch ``p`` of an epoch is ``batch_size * world_size``
    consecutive indices of the epoch's permutation, and rank ``r`` gets the ``r``-th slice.
    With ``lengths`` (one per sample) the permutation is :func:`~.packing.length_grouped_order`:
    each global batch holds samples of similar length, the batches still in a shuffled order.
    ``position`` counts global batches already yielded in ``epoch``; iteration runs from
    there through ``num_epochs`` (forever when None). Under a prefetching ``DataLoader`` the
    state runs ahead of the consumer: use :func:`batch_iterator` for exact resume.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shuffle: bool = True,
        num_epochs: int | None = None,
        start_batch: int = 0,
        lengths: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"got {len(lengths)} lengths for {num_samples} samples")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got "
                f"batch_size={batch_size} rank={rank} world_size={world_size}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        g = batch_size * world_size
        self.batches_per_epoch = num_samples // g if drop_last else -(-num_samples // g)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset of {num_samples} samples has no full global batch of {g} "
                f"(batch_size={batch_size} x world_size={world_size})"
            )
        self.epoch, self.position = divmod(start_batch, self.batches_per_epoch)

    @property
    def global_batch(self) -> int:
        """Global batches consumed since the start of epoch 0."""
        return self.epoch * self.batches_per_epoch + self.position

    def order(self, epoch: int) -> np.ndarray:
        """Sample order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        rng = np.random.default_rng([self.seed, epoch])
        if self.lengths is not None:
            return length_grouped_order(self.lengths, self.batch_size * self.world_size, rng)
        return rng.permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch_size * self.world_size
        while self.num_epochs is None or self.epoch < self.num_epochs:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            order = self.order(self.epoch)
            while self.position < self.batches_per_epoch:
                start = self.position * g + self.rank * self.batch_size
                self.position += 1
                shard = order[start : min(start + self.batch_size, (self.position) * g)]
                if len(shard):
                    yield shard.tolist()

    def state_dict(self) -> dict[str, int]:
        """``epoch`` and ``position`` (global batches done in it), normalized past epoch ends."""
        epoch, position = divmod(self.global_batch, self.batches_per_epoch)
        return {"epoch": epoch, "position": position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state['epoch']``, ``state['position']``."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))


class BatchIterator:
    """Collated batches from a :class:`StatefulBatchSampler`, with exact-resume state."""

    def __init__(self, dataset: Dataset, sampler: StatefulBatchSampler) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self._it: Iterator[list[int]] | None = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.sampler)
        indices = next(self._it)
        return default_collate([self.dataset[i] for i in indices])

    def state_dict(self) -> dict[str, int]:
        """Sampler state after the batches returned so far."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved :meth:`state_dict`."""
        self.sampler.load_state_dict(state)
        self._it = None


def batch_iterator(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    group_by_length: bool = True,
) -> BatchIterator:
    """Iterate collated per-rank batches in a seeded shuffled order, from global batch ``start_batch``.

    Resuming with ``start_batch=N`` (or ``load_state_dict``) yields exactly the batches an
    uninterrupted run yields after its first ``N``; runs forever unless ``num_epochs`` is set.
    A dataset with ``group_lengths`` (unpacked SFT rows) is batched by similar length unless
    ``group_by_length`` is false.
    """
    sampler = StatefulBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        shuffle=shuffle,
        num_epochs=num_epochs,
        start_batch=start_batch,
        lengths=getattr(dataset, "group_lengths", None) if group_by_length else None,
    )
    return BatchIterator(dataset, sampler)
