"""The batch source of every trainer that reads images: global step -> this rank's rows -> decoded, augmented batch.

A step's batch is a pure function of ``(seed, step)``: the rows are a slice of the epoch's seeded permutation
(:func:`step_rows`), and each row is augmented with a generator seeded by ``(dataset seed, key, index)`` where
the key is the step (view ``v`` uses ``step + VIEW_KEY * v``). So a resumed run reads what a straight run
reads, 1 rank reads what N ranks read together, and 0 workers give what N workers give, bit for bit::

    for step, images, labels in step_batches(ds, 256, seed=0, start_step=0, end_step=1000, workers=4):
        ...                                                # images [b, 3, S, S], labels [b], b = 256 / world

Images are decoded in DataLoader worker processes (``workers``), in step order, ``prefetch`` batches ahead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import seeding
from .errors import MageError

__all__ = [
    "VIEW_KEY",
    "KeyedItems",
    "StepSampler",
    "data_loader",
    "default_workers",
    "stack",
    "step_batches",
    "step_rows",
]

#: augmentation key offset of a second (third...) view of the same rows: view ``v`` of step ``s`` is keyed
#: ``s + VIEW_KEY * v`` (the pre-training loop's MAGE-C views used the same offset before this module)
VIEW_KEY = 10_000_000

_perm_cache: dict[tuple[int, int, int], torch.Tensor] = {}  # (n, seed, epoch) -> the last epoch's permutation


def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _perm_cache:  # one entry: steps walk through an epoch in order
        _perm_cache.clear()
        _perm_cache[key] = torch.randperm(n, generator=seeding.generator(seed, seeding.PERMUTATION, epoch))
    return _perm_cache[key]


def step_rows(n: int, global_batch: int, seed: int, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's dataset indices at global step ``step``: LongTensor ``[global_batch / world]``.

    Epoch ``e`` is a seeded permutation of the ``n`` items cut into ``n // global_batch`` global batches (the
    last partial batch is dropped); rank ``r`` of ``world`` takes the ``r``-th contiguous part of each.

    Raises:
        MageError: fewer items than one global batch, or a global batch that ``world`` ranks cannot share.
    """
    if global_batch < 1 or world < 1 or not 0 <= rank < world:
        raise MageError(f"bad batch split: global batch {global_batch}, rank {rank} of {world}")
    if global_batch % world:
        raise MageError(f"global batch {global_batch} is not divisible by {world} ranks")
    if n < global_batch:
        raise MageError(f"dataset has {n} items, fewer than the global batch {global_batch}")
    if step < 0:
        raise MageError(f"step must be >= 0, got {step}")
    epoch, i = divmod(step, n // global_batch)
    b = global_batch // world
    start = i * global_batch + rank * b
    return _epoch_permutation(n, seed, epoch)[start : start + b].clone()  # a copy: callers may write to it


class StepSampler(Sampler):
    """Batch sampler over steps ``[start_step, end_step)``: for each step, ``[(key, index), ...]`` = this rank's
    rows (:func:`step_rows`) once per view, view 0 first, keyed ``step + VIEW_KEY * v``."""

    def __init__(
        self,
        n: int,
        global_batch: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world: int = 1,
        views: int = 1,
    ):
        if views < 1 or start_step < 0 or end_step < start_step:
            raise MageError(f"bad step range [{start_step}, {end_step}) or views {views}")
        step_rows(n, global_batch, seed, start_step, rank, world)  # bad sizes fail here, not in a worker
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start_step, self.end_step, self.rank, self.world, self.views = start_step, end_step, rank, world, views

    def __len__(self) -> int:
        return self.end_step - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.end_step):
            rows = step_rows(self.n, self.global_batch, self.seed, step, self.rank, self.world).tolist()
            yield [(step + VIEW_KEY * v, i) for v in range(self.views) for i in rows]


class KeyedItems(Dataset):
    """``dataset.item(index, key)`` behind ``__getitem__((key, index))``, the pairs :class:`StepSampler` yields."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key_index: tuple[int, int]):
        key, index = key_index
        return self.dataset.item(index, key)


def stack(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``[(image [3, S, S], label), ...]`` -> ``(images [b, 3, S, S], labels [b] int64)``."""
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.int64)


def default_workers() -> int:
    """Decoding worker processes when the caller does not say: up to 4, never more than the CPUs."""
    return min(4, os.cpu_count() or 1)


def _one_thread(_worker_id: int) -> None:
    # N workers x M intra-op threads would oversubscribe the CPUs the trainer also needs
    torch.set_num_threads(1)


def data_loader(
    dataset: Dataset, batch_sampler, workers: int = 0, pin_memory: bool = False, collate_fn=stack, prefetch: int = 2
) -> DataLoader:
    """The one DataLoader setup: batches from ``batch_sampler`` in its order, decoded by ``workers`` processes
    (one thread each), ``prefetch`` batches ahead per worker."""
    if workers < 0:
        raise MageError(f"workers must be >= 0, got {workers}")
    extra = {"prefetch_factor": prefetch, "worker_init_fn": _one_thread} if workers > 0 else {}
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory, **extra
    )


def step_batches(
    dataset,
    global_batch: int,
    seed: int,
    start_step: int,
    end_step: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    views: int = 1,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(step, images [views*b, 3, S, S] float, labels [views*b] int64)`` for each step in ``[start_step, end_step)``.

    ``b = global_batch / world`` rows of this rank; with ``views > 1`` the rows repeat once per view (view 0's
    rows first), each view differently augmented. ``dataset`` needs ``len()`` and ``item(index, key)``
    (:class:`mage.data.ImageDataset`). With a CUDA ``device`` batches are pinned and copied asynchronously.
    Stopping early (``break``, or ``close()`` on the iterator) shuts the workers down."""
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    sampler = StepSampler(len(dataset), global_batch, seed, start_step, end_step, rank, world, views)
    batches = iter(data_loader(KeyedItems(dataset), sampler, workers, pin_memory=cuda))
    try:
        for step, (images, labels) in zip(range(start_step, end_step), batches):  # the loader keeps step order
            if device is not None:
                images, labels = images.to(device, non_blocking=cuda), labels.to(device, non_blocking=cuda)
            yield step, images, labels
    finally:
        # now, not whenever the iterator is collected: a consumer that breaks out must not leave workers behind
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del batches
